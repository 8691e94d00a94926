"""What the evaluations share: caches by name, bits/value accounting, exact prefill and
its replay into a cache, greedy decoding, the paired bootstrap, provenance, report files.

Cache names (`make_cache`):
- any codec name or cache preset that `EccoCache` takes ("none", "ecco4", "kivi2", ...),
  run as users get it: fused attention (the default), exact sink and window at 16 bits;
  optional suffixes: "@fp32" / "@bf16" / "@fp16" store the exact sink and window in that
  dtype, "+decode" decodes the compressed part at every step instead of fused attention
  ("+fused", the default, is accepted too). "none" is the lossless reference: its exact
  parts stay in float32 unless a suffix says otherwise;
- "dynamic": transformers' plain `DynamicCache`;
- "hf-quanto-int4", "hf-quanto-int2": transformers' built-in `QuantizedCache` with the
  quanto backend and its documented defaults (q_group_size 64, axis_key 0, axis_value 0,
  residual_length 128); a "-kivi" suffix quantises keys along axis -1 instead (groups of
  64 consecutive tokens per channel, KIVI's key layout), values stay on axis 0;
- "eb<x>" (eb2, eb2.5, ...): the variable-rate, error-bounded Ecco codec at a target rate,
  `EccoCache(config, target_bits=x, residual_length=r)`; "eb@<arg>=<x>" (eb@bound=0.05)
  passes `<arg>=x` instead. Until EccoCache takes those arguments, making such a cache
  raises the TypeError EccoCache raises (evaluations record it as the row's error). The
  "@fp32"/"+decode" suffixes apply to them too.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eccokv.provenance import environment, package_versions, source_digests  # noqa: F401

HF_QUANTO = re.compile(r"^hf-quanto-int(?P<bits>[24])(?P<kivi>-kivi)?$")
HF_DEFAULTS = {"q_group_size": 64, "axis_key": 0, "axis_value": 0, "residual_length": 128}
EB = re.compile(r"^eb(?P<bits>\d+(?:\.\d+)?)?$")  # the variable-rate codec's names


# ------------------------------------------------------------------ provenance


def tensor_digest(x: torch.Tensor) -> str:
    """Short sha256 of a tensor's values (identifies the exact token windows used)."""
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------ progress


def progress(it: Iterable[Any], total: int | None = None, desc: str = "",
             enabled: bool = True) -> Iterator[Any]:
    """tqdm on stderr when installed, else a plain stderr counter; nothing if disabled."""
    if not enabled:
        yield from it
        return
    try:
        from tqdm import tqdm
    except ImportError:
        t0 = time.perf_counter()
        for i, x in enumerate(it):
            print(f"\r{desc} {i}/{total if total is not None else '?'} "
                  f"[{time.perf_counter() - t0:.0f} s]", end="", file=sys.stderr, flush=True)
            yield x
        print(file=sys.stderr)
        return
    yield from tqdm(it, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


# ------------------------------------------------------------------ caches by name


def is_hf(name: str) -> bool:
    """True for transformers' QuantizedCache rows ("hf-quanto-...")."""
    return name.startswith("hf-")


def hf_settings(name: str) -> dict[str, Any]:
    """QuantizedCache arguments for an "hf-quanto-int{2,4}[-kivi]" name."""
    m = HF_QUANTO.match(name)
    if m is None:
        raise ValueError(f"unknown QuantizedCache row {name!r}: expected hf-quanto-int4, "
                         "hf-quanto-int2 (optionally with -kivi)")
    kw = dict(HF_DEFAULTS, backend="quanto", nbits=int(m["bits"]))
    if m["kivi"]:
        kw["axis_key"] = -1
    return kw


EXACT_SUFFIXES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATH_SUFFIXES = {"fused": True, "decode": False}


def is_eb(name: str) -> bool:
    """True for the variable-rate codec's names ("eb3", "eb2.5@fp32", "eb@bound=0.05")."""
    return EB.match(name.split("+")[0].split("@")[0]) is not None


def parse_name(name: str) -> tuple[str, dict[str, Any]]:
    """"ecco4@fp32+decode" -> ("ecco4", {"exact_dtype": torch.float32, "fused": False}):
    an EccoCache name's codec and the options its suffixes set (module docstring).
    "eb2.5" -> ("eb2.5", {"target_bits": 2.5}); "eb@bound=0.05" -> ("eb", {"bound": 0.05})."""
    opts: dict[str, Any] = {}
    base, *paths = name.split("+")
    for p in paths:
        if p not in PATH_SUFFIXES:
            raise ValueError(f"unknown suffix +{p} in cache name {name!r}: expected "
                             + " or ".join(f"+{k}" for k in PATH_SUFFIXES))
        opts["fused"] = PATH_SUFFIXES[p]
    base, *ats = base.split("@")
    eb = EB.match(base)
    if eb is not None and eb["bits"] is not None:
        opts["target_bits"] = float(eb["bits"])
    for a in ats:
        if eb is not None and "=" in a:
            k, v = a.split("=", 1)
            try:
                x = float(v)
            except ValueError:
                x = None
            if not k.isidentifier() or k in opts or k in ("residual_length", "exact_dtype",
                                                         "fused") or x is None:
                raise ValueError(f"bad argument @{a} in cache name {name!r}: expected "
                                 "@<argument>=<number>, each argument once")
            opts[k] = x
            continue
        if a not in EXACT_SUFFIXES or "exact_dtype" in opts:
            raise ValueError(f"unknown exact dtype @{a} in cache name {name!r}: expected "
                             "one of " + ", ".join(f"@{k}" for k in EXACT_SUFFIXES))
        opts["exact_dtype"] = EXACT_SUFFIXES[a]
    if base == "none" and "exact_dtype" not in opts:
        opts["exact_dtype"] = torch.float32  # the lossless reference
    if eb is not None and not set(opts) - {"exact_dtype", "fused"}:
        raise ValueError(f"cache name {name!r} names no rate: expected eb<bits> (eb3, eb2.5) "
                         "or eb@<argument>=<number> (eb@bound=0.05)")
    return base, opts


def make_cache(name: str, config: Any, residual: int, fused: bool | None = None) -> Any:
    """A fresh cache for `name` (see the module docstring); `residual` is EccoCache's exact
    window (QuantizedCache rows keep their own residual_length of 128).

    fused: None (default) = what the name says (fused attention unless "+decode", as
    users get it; the model's attention implementation, shared through the config, is
    switched to "eccokv", which runs every other cache bit for bit as before); True/False
    overrides the name."""
    if name == "dynamic":
        from transformers import DynamicCache

        return DynamicCache(config=config)
    if is_hf(name):
        from transformers.cache_utils import QuantizedCache

        kw = hf_settings(name)
        backend = kw.pop("backend")
        return QuantizedCache(backend, config, **kw)
    from eccokv.hf.cache import EccoCache

    codec, opts = parse_name(name)
    if fused is not None:
        opts["fused"] = fused
    if is_eb(codec):  # the variable-rate codec: its arguments (target_bits, ...) are in opts
        return EccoCache(config, residual_length=residual, **opts)
    return EccoCache(config, codec, residual_length=residual, **opts)


def describe_cache(name: str, residual: int) -> dict[str, Any]:
    """JSON-able configuration of a named cache (codecs, grouping axes, exact window)."""
    if name == "dynamic":
        return {"cache": "transformers.DynamicCache"}
    if is_hf(name):
        return {"cache": "transformers.cache_utils.QuantizedCache", **hf_settings(name)}
    from eccokv.hf import spec as S
    from eccokv.hf.cache import DEFAULT_EXACT_DTYPE

    codec, opts = parse_name(name)
    exact = opts.get("exact_dtype")
    out = {"cache": "eccokv.EccoCache", "codec": codec, "residual_length": residual,
           "sink_tokens": getattr(S, "DEFAULT_SINK", 0),
           "attention": "fused" if opts.get("fused", True) else "decode",
           "exact_dtype": str(exact or DEFAULT_EXACT_DTYPE).replace("torch.", "")
           + ("" if exact else " (float32 models; 16-bit models keep theirs)")}
    if is_eb(codec):  # the variable-rate codec: the arguments its name passes to EccoCache
        return {**out, "arguments": {k: v for k, v in opts.items()
                                     if k not in ("exact_dtype", "fused")}}
    spec = S.layer_spec(codec)
    return {**out, "key": spec.key.describe(), "value": spec.value.describe()}


def family(name: str) -> str:
    """Method family for tables and plots."""
    if is_hf(name):
        return "hf QuantizedCache (quanto)"
    if is_eb(name):
        return "ecco-eb"
    name = parse_name(name)[0] if name != "dynamic" else name
    for prefix, fam in (("ecco", "ecco"), ("kivi", "kivi"), ("int", "int g128"),
                        ("fp8", "fp8")):
        if name.startswith(prefix):
            return fam
    return name


def _storage_nbytes(t: Any) -> int:
    """Bytes of a tensor, a tuple of them, or a tensor subclass's inner tensors (quanto)."""
    if isinstance(t, (tuple, list)):
        return sum(_storage_nbytes(x) for x in t)
    if isinstance(t, torch.Tensor):
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(_storage_nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()
    return 0


def _numel(t: Any) -> int:
    if isinstance(t, (tuple, list)):
        return _numel(t[0]) if t else 0
    return int(t.numel()) if isinstance(t, torch.Tensor) else 0


@dataclass
class Bits:
    """Bytes and values held by a cache, split into its compressed and exact parts."""

    compressed_bytes: int = 0
    compressed_values: int = 0
    exact_bytes: int = 0
    exact_values: int = 0

    @property
    def compressed_bits_per_value(self) -> float | None:
        """Every byte of the compressed part (codes, scales, metadata) per compressed value."""
        if not self.compressed_values:
            return None
        return 8.0 * self.compressed_bytes / self.compressed_values

    @property
    def cache_bits_per_value(self) -> float | None:
        """Whole cache: compressed part plus the exact window as stored (`exact_dtype`)."""
        n = self.compressed_values + self.exact_values
        return 8.0 * (self.compressed_bytes + self.exact_bytes) / n if n else None

    @property
    def cache_bits_per_value_fp16_window(self) -> float | None:
        """Whole cache with the exact window counted at 16 bits (an fp16/bf16 model)."""
        n = self.compressed_values + self.exact_values
        return 8.0 * (self.compressed_bytes + 2 * self.exact_values) / n if n else None

    def as_dict(self) -> dict[str, Any]:
        n = self.compressed_values + self.exact_values
        return {"compressed_bytes": self.compressed_bytes,
                "compressed_values": self.compressed_values,
                "exact_bytes": self.exact_bytes, "exact_values": self.exact_values,
                "compressed_fraction": self.compressed_values / n if n else None,
                "compressed_bits_per_value": self.compressed_bits_per_value,
                "cache_bits_per_value": self.cache_bits_per_value,
                "cache_bits_per_value_fp16_window": self.cache_bits_per_value_fp16_window}


def cache_bits(cache: Any, values_per_token: int) -> Bits:
    """Account every byte a cache holds.

    EccoCache: `memory_report()`; compressed bytes = compressed arrays + chunk metadata
    (`compressed_bytes + metadata_bytes`), compressed values = compressed tokens x
    `values_per_token` (batch x kv heads x head_dim), per K and V stream; the exact
    window and the exact attention-sink tokens are the exact part.
    QuantizedCache (quanto): the storage of the quantised tensors' inner tensors (packed
    codes + scales + shifts) over their element count; its residual window is exact.
    DynamicCache (or a plain layer): everything exact.
    """
    from eccokv.hf.cache import EccoCache

    b = Bits()
    if isinstance(cache, EccoCache):
        rep = cache.memory_report()
        for lay in rep["layers"]:
            if "key" not in lay:  # a transformers layer kept exact (sliding window)
                b.exact_bytes += lay["total_bytes"]
                b.exact_values += lay["fp16_bytes"] // 2
                continue
            for s in ("key", "value"):
                st = lay[s]
                b.compressed_bytes += st["compressed_bytes"] + st["metadata_bytes"]
                b.compressed_values += st["compressed_tokens"] * values_per_token
                b.exact_bytes += st["exact_bytes"]  # exact window + exact sink tokens
                b.exact_values += (st["exact_tokens"] + st.get("sink_tokens", 0)
                                   ) * values_per_token
        return b
    for lay in cache.layers:
        for qname in ("_quantized_keys", "_quantized_values"):
            q = getattr(lay, qname, None)
            if q is not None:
                b.compressed_bytes += _storage_nbytes(q)
                b.compressed_values += _numel(q)
        for ename in ("keys", "values"):
            t = getattr(lay, ename, None)
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                b.exact_bytes += t.numel() * t.element_size()
                b.exact_values += t.numel()
    return b


def values_per_token(model: Any, batch: int = 1) -> int:
    """K (or V) values one token adds to one layer: batch x kv heads x head_dim."""
    from eccokv.models import model_info

    info = model_info(model)
    return batch * info["n_kv_heads"] * info["head_dim"]


# ------------------------------------------------------------------ model helpers


@torch.no_grad()
def exact_prefill(model: Any, ids: torch.Tensor, chunk: int | None = None
                  ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Run `ids` [1, T] through a DynamicCache (in chunks of `chunk` tokens if given).

    Returns every layer's (K, V) [1, Hkv, T, D] and the last position's logits [vocab].
    With chunk=None this is exactly the prefill a cache whose prefill attention is exact
    (EccoCache, QuantizedCache) performs; `replay` then loads the K/V into such a cache.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    step = chunk or ids.shape[1]
    out = None
    for s in range(0, ids.shape[1], step):
        out = model(ids[:, s:s + step], past_key_values=cache, use_cache=True, logits_to_keep=1)
    assert out is not None
    kv = [(lay.keys, lay.values) for lay in cache.layers]
    return kv, out.logits[0, -1].float()


def replay(cache: Any, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """Feed a prefill's K/V into `cache`, layer by layer: the same `update` calls the model
    makes during a prefill forward, so the cache ends in the same state."""
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


@torch.no_grad()
def forward_last(model: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Run `ids` [1, S] through `cache`; the last position's logits [vocab]."""
    return model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]


@torch.no_grad()
def greedy(model: Any, cache: Any, first_logits: torch.Tensor, max_new: int,
           stop_ids: Iterable[int] = ()) -> list[int]:
    """Greedy tokens: the first from `first_logits`, then one forward per token through
    `cache`; stops after `max_new` tokens or after emitting a token in `stop_ids`."""
    stop = set(stop_ids)
    out: list[int] = []
    nxt = int(first_logits.argmax())
    while True:
        out.append(nxt)
        if nxt in stop or len(out) >= max_new:
            return out
        nxt = int(forward_last(model, torch.tensor([[nxt]]), cache).argmax())


def chat_split(tokenizer: Any, context: str, question: str, system: str | None = None,
               answer_prefix: str = "") -> tuple[list[int], list[int]]:
    """Token ids of a one-turn chat prompt, split after the context.

    The user message is `context + "\\n\\n" + question`; returns (ids up to the end of the
    context, the rest: question, end of turn, the assistant header and `answer_prefix`,
    the start of the answer), so a cache can hold the context before the question is read.
    """
    marker = "\x00EccoKVSplit\x00"
    msgs = [{"role": "user", "content": context + marker + "\n\n" + question}]
    if system is not None:
        msgs.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    head, tail = text.split(marker)
    tail += answer_prefix
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    return enc(head), enc(tail)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """End-of-turn / end-of-text ids of a chat tokenizer."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id:
            ids.add(i)
    return sorted(ids)


# ------------------------------------------------------------------ statistics


def paired_rel_change(nll: Sequence[float], ref: Sequence[float], n_boot: int = 2000,
                      seed: int = 0, q: tuple[float, float] = (5.0, 95.0)) -> dict[str, Any]:
    """Relative perplexity change of `nll` vs `ref` (per-window mean NLLs, equal tokens per
    window), in %, with a paired bootstrap over windows and per-window min/max.

    change = exp(mean(nll) - mean(ref)) - 1; the bootstrap resamples window indices with
    replacement (the same indices for both: paired) and reports the q percentiles.
    """
    a, r = np.asarray(nll, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if a.shape != r.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal-length 1-d sequences, got {a.shape} and {r.shape}")
    d = a - r
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    boot = np.expm1(d[idx].mean(axis=1)) * 100
    per = np.expm1(d) * 100
    return {"rel_change_pct": float(np.expm1(d.mean()) * 100),
            "ci_low_pct": float(np.percentile(boot, q[0])),
            "ci_high_pct": float(np.percentile(boot, q[1])),
            "ci_percentiles": list(q), "n_boot": n_boot,
            "window_min_pct": float(per.min()), "window_max_pct": float(per.max()),
            "windows_worse": int((d > 0).sum()), "windows": int(d.size)}


def agreement(ref: Sequence[int], got: Sequence[int]) -> dict[str, Any]:
    """Position-by-position agreement of two token sequences.

    fraction: identical positions / the longer length (missing positions count as
    different); first_divergence: the first index that differs (None if identical).
    """
    n = max(len(ref), len(got))
    same = sum(1 for a, b in zip(ref, got, strict=False) if a == b)
    first = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), None)
    if first is None and len(ref) != len(got):
        first = min(len(ref), len(got))
    return {"fraction": same / n if n else 1.0, "identical": same, "length": n,
            "first_divergence": first,
            "tokens_before_divergence": n if first is None else first}


def normalise(s: str) -> str:
    """Lower case, letters and digits only (so "4,829,173" matches "4829173")."""
    return re.sub(r"[^0-9a-z]", "", s.lower())


def contains_fact(answer: str, fact: str) -> bool:
    """Needle scoring: the answer contains the fact (ignoring case, spaces, punctuation)."""
    f = normalise(fact)
    return bool(f) and f in normalise(answer)


# ------------------------------------------------------------------ reports


def fmt(x: Any, spec: str = ".3f", none: str = "-") -> str:
    """Format a number for a table (None -> `none`)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Markdown table lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return lines


def provenance_lines(result: dict[str, Any]) -> list[str]:
    """Markdown lines: command, model, data, packages, machine, date."""
    env = result["environment"]
    pk = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    return [f"Command: `{result['command']}`  ",
            f"Model: {result['model']['name']} ({json.dumps(result['model'])})  ",
            f"Data: {result['data']['description']}  ",
            f"Packages: {pk}  ",
            f"Machine: {env['cpu']} x{env['cpu_count']}, {env['memory_gb']} GB, "
            f"{env['platform']}; torch threads {env['torch_threads']}, numba threading "
            f"layer {env['numba_threading_layer']}, env {env['env']}  ",
            f"Date: {env['date']}; wall time {result.get('seconds', 0):.0f} s"]


def write_reports(result: dict[str, Any], markdown: str, out_dir: str | Path,
                  stem: str) -> list[Path]:
    """Write `<stem>.json` and `<stem>.md` into `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pj, pm = out / f"{stem}.json", out / f"{stem}.md"
    pj.write_text(json.dumps(result, indent=1, default=float) + "\n", encoding="utf-8")
    pm.write_text(markdown, encoding="utf-8")
    return [pj, pm]


def model_block(model: Any) -> dict[str, Any]:
    """Model facts for a result file."""
    from eccokv.models import model_info

    info = model_info(model)
    info["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    info["max_positions"] = getattr(model.config, "max_position_embeddings", None)
    info["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    return info
