"""Calibration data for bit allocation: how much each K/V stream's error costs, and where.

    sens = measure_sensitivity(model, tok)            # per layer, K and V: dnll, bits, c
    moments = measure_query_moments(model, tok)        # [n_layers, n_kv_heads, head_dim]
    bits = allocate(sens, target_bits=3.0)             # {(layer, "k"|"v"): bits/value}
    w = channel_weights(moments, layer=5)              # [n_kv_heads, head_dim], geomean 1
    run_calibration("smollm2", out="alloc.json")       # both, saved (save/load_allocation)

Sensitivity. A stream is one layer's K or one layer's V. On real calibration text (windows
disjoint from the ones `eccokv eval ppl` scores, see `calibration_windows`), each window's
first `context` tokens are prefilled once, exactly (`eval.common.exact_prefill`), and
replayed into one `EccoCache` per stream in which only that stream is compressed with
`codec` and every other stream is stored exactly (codec "none", float32), with the
evaluation's protocol otherwise (`eval.ppl.score_window`: 4 exact sink tokens, no exact
window, the next `score` tokens scored in one forward). dnll is the increase of the mean
NLL of the scored tokens over the all-exact cache, paired on the same tokens. On its own
it is noisy (often negative): to first order the NLL moves by gradient . error, which is
as likely to lower it as to raise it. The default estimator ("antithetic") therefore also
scores the mirrored error (the stream set to x - (x_hat - x)) and takes the mean of the
two increases, in which that first-order term (and every odd one) cancels, leaving the
second-order term the model below describes. The estimate is kept raw and also floored at
`floor` (> 0).

The model. At high rate an entropy-coded scalar quantiser's MSE is ~ 2**(-2R) per value
(ECSQ), and a small perturbation's NLL increase is ~ proportional to its MSE, so

    dnll_s(R) ~ c_s * 2**(-2 R),     c_s = max(estimate_s, floor) * 2**(2 * bits_s)

where bits_s is the rate the calibration codec spent on stream s. Minimising sum_s
dnll_s(R_s) subject to sum_s w_s R_s = target * sum_s w_s (w_s: values in stream s) gives
(Lagrange) R_s = target + 0.5 * log2(c_s / G), G = the w-weighted geometric mean of c;
`allocate` then clips to [min_bits, max_bits] and moves the clipped rate to the free
streams so that the weighted mean stays exactly `target` (the KKT solution under the box
constraints). It is a model: it ignores interactions between streams and is only as good
as the ECSQ slope at low rates (below ~2 bits real quantisers fall off it).

Query moments. Attention scores are q . k, so a key error e adds sum_c q_c e_c to a score;
with errors independent of q its expected square is sum_c E[q_c^2] e_c^2. E[q_c^2] of the
queries after RoPE (as the attention function receives them), averaged over tokens and over
the query heads sharing each KV head, weights key channel c's error ("attention-aware
keys"); `channel_weights` normalises one layer's to geometric mean 1.

Files (`save_allocation` / `load_allocation`): JSON, {"format": "eccokv-allocation",
"version": 1}, the model fingerprint (`eccokv.hf.persist.model_fingerprint`), the
calibration settings, per stream dnll (and its mirror) / estimate / bits / c, the query
moments as nested lists.
A file is untrusted input: loading checks every field (types, shapes, finiteness, the
version, the fingerprint when a config is given) and raises `AllocationFileError` (a
ValueError) naming what is wrong; nothing named inside a file is ever opened.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import re
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "eccokv-allocation"
VERSION = 1
STREAMS = ("k", "v")
MAX_FILE_BYTES = 16 << 20  # refuse larger files before parsing (untrusted input)

DEFAULT_CODEC = "int3"
# 4 exact sink tokens + 512: with no exact window, exactly 512 tokens (4 groups of 128) are
# compressed (as eval ppl's context of 1028 = 4 + 1024)
DEFAULT_CONTEXT = 516
DEFAULT_SCORE = 128
DEFAULT_WINDOWS = 2
DEFAULT_CORPUS = "wiki"
# floor for dnll, as a fraction of the mean of max(dnll, 0) over the streams: a stream whose
# measured dnll is <= 0 counts as 20x less sensitive than the average stream
DEFAULT_FLOOR_FRACTION = 0.05
# calibration windows come from token_windows(seed=WINDOW_SEED_BASE + WINDOW_SEED_STRIDE *
# seed + i), the first i < WINDOW_SEED_STRIDE whose windows are disjoint from EVAL_WINDOWS
# (so two calibration seeds never draw the same windows)
WINDOW_SEED_BASE = 7919
WINDOW_SEED_STRIDE = 1000
# the windows eval ppl scores (window = context + score tokens, n, seed), per corpus: its
# default (8 windows of 1028 + 256, seed 0), the 32-window check (seed 1) and the other
# window counts and seeds a run of `eccokv eval ppl` is likely to use
EVAL_WINDOWS = tuple((1284, n, s) for n in (4, 8, 16, 32) for s in (0, 1))


class AllocationFileError(ValueError):
    """An allocation file (or dict) that is malformed, of another version or model."""


# ------------------------------------------------------------------ calibration text


def _window_starts(stream: np.ndarray, wins: np.ndarray) -> list[int]:
    """Every position of `stream` where one of the rows of `wins` occurs (exact match)."""
    W = wins.shape[1]
    n = stream.size - W + 1
    out: list[int] = []
    for row in wins:
        cand = np.flatnonzero(stream[:n] == row[0])
        for j in range(1, W):
            if cand.size <= 1:
                break
            cand = cand[stream[cand + j] == row[j]]
        out += [int(p) for p in cand if np.array_equal(stream[p:p + W], row)]
    return out


def calibration_windows(tokenizer: Any, corpus: str = DEFAULT_CORPUS, window: int = 644,
                        n: int = DEFAULT_WINDOWS, seed: int = 0,
                        avoid: Iterable[tuple[int, int, int]] = EVAL_WINDOWS
                        ) -> tuple[Any, dict[str, Any]]:
    """`n` windows of `window` tokens (LongTensor [n, window]) that share no token
    position with the windows eval ppl scores (`avoid`: (window, n, seed) of
    `eccokv.data.token_windows` calls on the same corpus).

    Drawn with `token_windows(seed=WINDOW_SEED_BASE + WINDOW_SEED_STRIDE * seed + i)` for
    the first i = 0, 1, ... (< WINDOW_SEED_STRIDE) whose windows are disjoint.
    Returns the windows and {"window_seed", "starts", "avoided"}.
    """
    from eccokv import data

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    stream = data.corpus_tokens(tokenizer, corpus).numpy()
    busy: list[tuple[int, int]] = []
    avoided = []
    for w, k, s in avoid:
        try:
            ev = data.token_windows(tokenizer, corpus, window=w, n=k, seed=s).numpy()
        except ValueError:  # corpus too short for that evaluation: nothing to avoid
            continue
        busy += [(p, p + w) for p in _window_starts(stream, ev)]
        avoided.append({"window": w, "n": k, "seed": s})
    for i in range(WINDOW_SEED_STRIDE):
        ws = WINDOW_SEED_BASE + WINDOW_SEED_STRIDE * seed + i
        wins = data.token_windows(tokenizer, corpus, window=window, n=n, seed=ws)
        starts = _window_starts(stream, wins.numpy())
        if all(b <= p or p + window <= a for p in starts for a, b in busy):
            return wins, {"window_seed": ws, "starts": sorted(set(starts)), "avoided": avoided}
    raise ValueError(f"no {n} windows of {window} tokens in corpus {corpus!r} disjoint from "
                     f"the evaluation's windows after {WINDOW_SEED_STRIDE} seeds")


# ------------------------------------------------------------------ sensitivity


def _n_layers(config: Any) -> int:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def _stream_cache(config: Any, layer: int | None, stream: str, codec: Any,
                  sink_tokens: int | None) -> Any:
    """EccoCache with only (layer, stream) compressed by `codec` (None: nothing), every
    other stream exact (codec "none", float32), no exact window, every layer ours."""
    import torch

    from eccokv.hf.cache import EccoCache

    layers = None
    if layer is not None:
        spec = {"key_codec": codec if stream == "k" else "none",
                "value_codec": codec if stream == "v" else "none"}
        layers = {layer: spec}
    return EccoCache(config, "none", layers=layers, residual_length=0, sink_tokens=sink_tokens,
                     exact_dtype=torch.float32, fused=False, sliding="compress")


def _stream_bits(cache: Any, layer: int, stream: str, values_per_token: int) -> float:
    """Bits per compressed value of one stream, every byte counted (codes, scales, chunk
    metadata, the codec config), as `eval.common.cache_bits` counts them."""
    st = cache.memory_report()["layers"][layer]["key" if stream == "k" else "value"]
    n = st["compressed_tokens"] * values_per_token
    if not n:
        raise ValueError(f"layer {layer} {stream}: nothing was compressed (context too short "
                         "for one group of the codec)")
    return 8.0 * (st["compressed_bytes"] + st["metadata_bytes"]) / n


def _decoded(cache: Any, layer: int, stream: str) -> Any:
    """Layer `layer`'s K or V [B, H, T, D] as attention reads it: sink ++ decoded chunks ++
    exact window (float32)."""
    import torch

    lay = cache.layers[layer]
    st = lay.k if stream == "k" else lay.v
    B, H, _, D = st.held.shape
    return st.view_with(torch.empty((B, H, 0, D), dtype=torch.float32))


def measure_sensitivity(model: Any, tokenizer: Any, corpus: str = DEFAULT_CORPUS,
                        windows: int = DEFAULT_WINDOWS, context: int = DEFAULT_CONTEXT,
                        score: int = DEFAULT_SCORE, codec: Any = DEFAULT_CODEC, seed: int = 0,
                        estimator: str = "antithetic", floor: float | None = None,
                        sink_tokens: int | None = None,
                        show_progress: bool = False) -> dict[str, Any]:
    """Per stream (layer l's K or V): the mean-NLL increase of the scored tokens when only
    that stream is compressed with `codec` (module docstring: protocol and model).

    dnll: that increase, raw. estimator "antithetic" (default) also scores the mirrored
    error: the stream set to x - (x_hat - x), every other stream exact (`dnll_mirror`),
    and estimates the sensitivity as (dnll + dnll_mirror) / 2. The NLL's first-order
    response to the error (gradient . error: as likely to lower the NLL as to raise it,
    and the largest part of a single measurement's noise) cancels in that sum, leaving the
    second-order term the ECSQ model describes. "plain": the estimate is dnll (one
    scoring forward per stream instead of two).

    Cost per window: one exact prefill, 1 + 2 x n_layers scoring forwards (twice as many
    streams' forwards for "antithetic"). `floor`: the floor of the estimate (default
    DEFAULT_FLOOR_FRACTION x the mean of max(estimate, 0), at least 1e-9). Returns
    {"settings", "reference_nll", "reference_window_nll", "floor", "streams": [{"layer",
    "stream", "dnll", "dnll_mirror", "estimate", "dnll_floored", "bits", "c",
    "window_dnll", "window_dnll_mirror"}], "seconds"}.
    """
    import torch

    from eccokv.eval import common as E
    from eccokv.eval.ppl import score_window
    from eccokv.hf.spec import DEFAULT_SINK
    from eccokv.hf.spec import stream as stream_spec

    if estimator not in ("antithetic", "plain"):
        raise ValueError(f"estimator must be 'antithetic' or 'plain', got {estimator!r}")
    t0 = time.perf_counter()
    codec_obj = stream_spec(codec, "tokens").codec  # validates the codec first
    codec_name = codec if isinstance(codec, str) else codec_obj.get_config()["id"]
    sink = DEFAULT_SINK if sink_tokens is None else sink_tokens
    wins, where = calibration_windows(tokenizer, corpus, context + score, windows, seed)
    n_layers = _n_layers(model.config)
    vpt = E.values_per_token(model)
    jobs = [(w, l, s) for w in range(windows)
            for l, s in [(None, "")] + [(l, s) for l in range(n_layers) for s in STREAMS]]
    ref: list[float] = []
    keys = [(l, s) for l in range(n_layers) for s in STREAMS]
    plus: dict[tuple[int, str], list[float]] = {k: [] for k in keys}
    minus: dict[tuple[int, str], list[float]] = {k: [] for k in keys}
    bits: dict[tuple[int, str], float] = {}
    kv: Any = None
    last: Any = None
    with torch.no_grad():
        for w, l, s in E.progress(jobs, total=len(jobs), desc="sensitivity",
                                  enabled=show_progress):
            ids = wins[w:w + 1]
            if l is None:
                kv, last = E.exact_prefill(model, ids[:, :context])
                nll, _ = score_window(model, ids, context,
                                      _stream_cache(model.config, None, "", None, sink),
                                      (kv, last))
                ref.append(float(nll.mean()))
                continue
            cache = _stream_cache(model.config, l, s, codec_obj, sink)
            E.replay(cache, kv)
            if (l, s) not in bits:
                bits[(l, s)] = _stream_bits(cache, l, s, vpt)
            if estimator == "antithetic":
                k, v = kv[l]
                x = k if s == "k" else v
                mirror = 2 * x.float() - _decoded(cache, l, s)
                kv2 = list(kv)
                kv2[l] = (mirror.to(k.dtype), v) if s == "k" else (k, mirror.to(v.dtype))
            nll, _ = score_window(model, ids, context, cache, ([], last))  # replayed above
            plus[(l, s)].append(float(nll.mean()) - ref[w])
            if estimator == "antithetic":
                nll, _ = score_window(model, ids, context,
                                      _stream_cache(model.config, None, "", None, sink),
                                      (kv2, last))
                minus[(l, s)].append(float(nll.mean()) - ref[w])
    est = {}
    for k in keys:
        d = float(np.mean(plus[k]))
        est[k] = d if estimator == "plain" else 0.5 * (d + float(np.mean(minus[k])))
    if floor is None:
        floor = max(1e-9, DEFAULT_FLOOR_FRACTION * float(np.mean(
            [max(e, 0.0) for e in est.values()])))
    if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor > 0):
        raise ValueError(f"floor must be a finite number > 0, got {floor!r}")
    rows = []
    for k in keys:
        df = max(est[k], float(floor))
        anti = estimator == "antithetic"
        rows.append({"layer": k[0], "stream": k[1], "dnll": float(np.mean(plus[k])),
                     "dnll_mirror": float(np.mean(minus[k])) if anti else None,
                     "estimate": est[k], "dnll_floored": df, "bits": bits[k],
                     "c": df * 2.0 ** (2 * bits[k]), "window_dnll": plus[k],
                     "window_dnll_mirror": minus[k] if anti else None})
    settings = {"corpus": corpus, "windows": windows, "context": context, "score": score,
                "codec": codec_name, "codec_config": codec_obj.get_config(), "seed": seed,
                "estimator": estimator, "sink_tokens": sink, "residual_length": 0,
                "exact": "none (float32)", "floor_fraction": DEFAULT_FLOOR_FRACTION, **where}
    return {"settings": settings, "reference_nll": float(np.mean(ref)),
            "reference_window_nll": ref, "floor": float(floor), "streams": rows,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------ query moments

_CAPTURE = "eccokv-capture-queries"


def measure_query_moments(model: Any, tokenizer: Any, corpus: str = DEFAULT_CORPUS,
                          windows: int = DEFAULT_WINDOWS,
                          tokens: int = DEFAULT_CONTEXT + DEFAULT_SCORE, seed: int = 0,
                          wins: Any = None) -> np.ndarray:
    """E[q_c^2] [n_layers, n_kv_heads, head_dim] (float64) of the queries after RoPE.

    One plain forward per calibration window (`calibration_windows`, or `wins` [n, T]);
    the model's attention implementation is switched for the duration to a capture
    function (registered with transformers' AttentionInterface under its own name) that
    records q and calls sdpa, then restored. Averaged over all tokens and over the query
    heads of each KV group (query head h reads KV head h // (n_heads / n_kv_heads), as
    transformers' repeat_kv does). Layers the forward never reaches stay 0.
    """
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from eccokv.models import model_info

    info = model_info(model)
    L, Hkv, D = info["n_layers"], info["n_kv_heads"], info["head_dim"]
    if wins is None:
        wins, _ = calibration_windows(tokenizer, corpus, tokens, windows, seed)
    sums = np.zeros((L, Hkv, D))
    counts = np.zeros(L)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def capture(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Any, **kwargs: Any) -> Any:
        li = int(module.layer_idx)
        B, Hq, T, Dq = query.shape
        if Hq % Hkv or Dq != D:
            raise ValueError(f"layer {li}: queries {tuple(query.shape)} do not fit "
                             f"{Hkv} KV heads of head_dim {D}")
        q2 = query.detach().double().square().reshape(B, Hkv, Hq // Hkv, T, D)
        sums[li] += q2.mean(dim=2).sum(dim=(0, 2)).numpy()
        counts[li] += B * T
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_CAPTURE, capture)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_CAPTURE, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    text = (model.config.get_text_config(decoder=True)
            if hasattr(model.config, "get_text_config") else model.config)
    configs = [model.config] + ([text] if text is not model.config else [])
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = _CAPTURE
        with torch.no_grad():
            for w in range(wins.shape[0]):
                model(wins[w:w + 1], use_cache=False, logits_to_keep=1)
    finally:  # the main config first: its setter also sets the sub-configs
        for c, b in zip(configs, before, strict=True):
            c._attn_implementation = b
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(counts[:, None, None] > 0, sums / np.maximum(counts, 1)[:, None, None],
                       0.0)
    return out


def channel_weights(moments: Any, layer: int, eps: float = 1e-12) -> np.ndarray:
    """Layer `layer`'s E[q_c^2] [n_kv_heads, head_dim] divided by their geometric mean
    (over the layer's heads and channels), so the weights multiply to 1. Moments below
    eps x the layer's largest are raised to that (a zero would make the mean 0)."""
    m = np.asarray(moments, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"moments must be [n_layers, n_kv_heads, head_dim], got {m.shape}")
    if not 0 <= layer < m.shape[0]:
        raise ValueError(f"layer {layer} out of range 0..{m.shape[0] - 1}")
    x = m[layer]
    if not np.isfinite(x).all() or (x < 0).any():
        raise ValueError(f"layer {layer}: moments must be finite and >= 0")
    top = float(x.max())
    if top <= 0:
        return np.ones_like(x)
    x = np.maximum(x, eps * top)
    return x / math.exp(float(np.log(x).mean()))


# ------------------------------------------------------------------ allocation


def sensitivities(data: Any) -> dict[tuple[int, str], float]:
    """{(layer, "k"|"v"): c} from a `measure_sensitivity` / `load_allocation` dict or a
    mapping that already is one."""
    if isinstance(data, Mapping) and "streams" in data:
        return {(int(r["layer"]), str(r["stream"])): float(r["c"]) for r in data["streams"]}
    if isinstance(data, Mapping):
        return {(int(k[0]), str(k[1])): float(v) for k, v in data.items()}
    raise TypeError(f"sensitivity must be a dict, got {type(data).__name__}")


def allocate(sensitivity: Any, target_bits: float,
             sizes: Mapping[tuple[int, str], float] | None = None, min_bits: float = 1.5,
             max_bits: float = 8.0) -> dict[tuple[int, str], float]:
    """Bits/value per stream, {(layer, "k"|"v"): R_s}, for a size-weighted mean rate of
    exactly `target_bits`.

    Model (module docstring): dnll_s(R) = c_s 2**(-2R). Minimising sum_s dnll_s(R_s) at
    sum_s w_s R_s = target sum_s w_s (w_s = sizes[s], values per stream; all 1 if None)
    gives R_s = target + 0.5 log2(c_s / G), G = exp(sum_s w_s ln c_s / sum_s w_s), the
    w-weighted geometric mean of c. With the box min_bits <= R_s <= max_bits the optimum
    is R_s = clip(theta + 0.5 log2 c_s, min_bits, max_bits) with the one theta that makes
    the weighted mean `target`: found by bisection (the mean is monotone in theta), then
    solved exactly over the streams left unclipped, so the clipped rate is redistributed
    over the others. More sensitive (larger c) -> never fewer bits.

    sensitivity: a `measure_sensitivity` / `load_allocation` dict or {(layer, kind): c},
    every c finite and > 0.
    """
    c = sensitivities(sensitivity)
    if not c:
        raise ValueError("no streams to allocate")
    keys = sorted(c)
    for k in keys:
        if k[1] not in STREAMS:
            raise ValueError(f"stream {k}: kind must be 'k' or 'v'")
    cs = np.array([c[k] for k in keys], dtype=np.float64)
    if not np.isfinite(cs).all() or (cs <= 0).any():
        bad = [k for k, v in zip(keys, cs, strict=True) if not (math.isfinite(v) and v > 0)]
        raise ValueError(f"sensitivities must be finite and > 0 (floor dnll first): {bad[:5]}")
    if sizes is None:
        w = np.ones(len(keys))
    else:
        missing = [k for k in keys if k not in sizes]
        if missing:
            raise ValueError(f"sizes lacks streams {missing[:5]}")
        w = np.array([float(sizes[k]) for k in keys])
        if not np.isfinite(w).all() or (w <= 0).any():
            raise ValueError("sizes must be finite and > 0")
    for name, v in (("target_bits", target_bits), ("min_bits", min_bits),
                    ("max_bits", max_bits)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not min_bits <= max_bits:
        raise ValueError(f"min_bits ({min_bits}) > max_bits ({max_bits})")
    if not min_bits <= target_bits <= max_bits:
        raise ValueError(f"target_bits {target_bits} outside [min_bits {min_bits}, "
                         f"max_bits {max_bits}]")
    w = w / w.sum()
    half = 0.5 * np.log2(cs)

    def mean_at(theta: float) -> float:
        return float((w * np.clip(theta + half, min_bits, max_bits)).sum())

    # theta + half is the unconstrained solution; the answer lies in [lo, hi]
    lo = min_bits - float(half.max()) - 1.0
    hi = max_bits - float(half.min()) + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mean_at(mid) < target_bits:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    r = 0.5 * (lo + hi) + half
    fixed = (r <= min_bits) | (r >= max_bits)
    out = np.clip(r, min_bits, max_bits)
    while not fixed.all():  # exact: the free streams carry what the clipped ones do not
        free = ~fixed
        rest = target_bits - float((w * out)[fixed].sum())
        theta = (rest - float((w * half)[free].sum())) / float(w[free].sum())
        r = theta + half
        out[free] = np.clip(r[free], min_bits, max_bits)
        newly = free & ((r < min_bits) | (r > max_bits))
        if not newly.any():
            break
        fixed |= newly  # a stream at the edge of the box after bisection: fix it, resolve
    return {k: float(v) for k, v in zip(keys, out, strict=True)}


def weighted_mean_bits(alloc: Mapping[tuple[int, str], float],
                       sizes: Mapping[tuple[int, str], float] | None = None) -> float:
    """The size-weighted mean of an allocation (all sizes 1 if None)."""
    keys = list(alloc)
    w = np.array([1.0 if sizes is None else float(sizes[k]) for k in keys])
    return float((w * np.array([alloc[k] for k in keys])).sum() / w.sum())


def stream_sizes(config: Any) -> dict[tuple[int, str], int]:
    """Values per token of every stream (kv heads x head_dim; equal for K and V)."""
    from eccokv.hf.persist import kv_shape

    h, d = kv_shape(config)
    return {(l, s): h * d for l in range(_n_layers(config)) for s in STREAMS}


# ------------------------------------------------------------------ files


def _model_block(model_or_config: Any) -> dict[str, Any]:
    from eccokv.hf.persist import kv_shape, model_fingerprint, text_config

    config = getattr(model_or_config, "config", model_or_config)
    t = text_config(config)
    h, d = kv_shape(config)
    name = (getattr(model_or_config, "eccokv_name", None) or getattr(t, "name_or_path", None)
            or getattr(t, "model_type", "?"))
    return {"fingerprint": model_fingerprint(config), "name": str(name),
            "model_type": str(getattr(t, "model_type", "?")),
            "n_layers": int(t.num_hidden_layers), "n_heads": int(t.num_attention_heads),
            "n_kv_heads": h, "head_dim": d}


def make_allocation(model: Any, sensitivity: dict[str, Any], moments: Any,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The file's dict from measure_sensitivity and measure_query_moments results."""
    settings = dict(sensitivity["settings"])
    settings["seconds"] = float(sensitivity.get("seconds", 0.0))
    if extra:
        settings.update(extra)
    doc = {"format": FORMAT, "version": VERSION, "model": _model_block(model),
           "calibration": settings,
           "reference_nll": float(sensitivity["reference_nll"]),
           "floor": float(sensitivity["floor"]),
           "streams": [{k: r[k] for k in _STREAM} for r in sensitivity["streams"]],
           "query_moments": np.asarray(moments, dtype=np.float64)}
    return validate_allocation(doc)


def _fail(what: str) -> AllocationFileError:
    return AllocationFileError(f"allocation file: {what}")


def _num(x: Any, what: str, lo: float | None = None, strict: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise _fail(f"{what} must be a number, got {type(x).__name__}")
    v = float(x)
    if not math.isfinite(v):
        raise _fail(f"{what} is not finite ({v})")
    if lo is not None and (v <= lo if strict else v < lo):
        raise _fail(f"{what} must be {'>' if strict else '>='} {lo}, got {v}")
    return v


def _int(x: Any, what: str, lo: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise _fail(f"{what} must be an integer, got {type(x).__name__}")
    if x < lo:
        raise _fail(f"{what} must be >= {lo}, got {x}")
    return int(x)


_TOP = {"format", "version", "model", "calibration", "reference_nll", "floor", "streams",
        "query_moments"}
_MODEL = {"fingerprint": str, "name": str, "model_type": str, "n_layers": int,
          "n_heads": int, "n_kv_heads": int, "head_dim": int}
_STREAM = ("layer", "stream", "dnll", "dnll_mirror", "estimate", "dnll_floored", "bits", "c",
           "window_dnll", "window_dnll_mirror")


def validate_allocation(doc: Any, config: Any = None) -> dict[str, Any]:
    """Check an allocation dict (as parsed from a file, or built); returns it with
    query_moments as a float64 ndarray. `config`: the model it must belong to (its
    fingerprint and shapes). Raises AllocationFileError naming the problem."""
    if not isinstance(doc, Mapping):
        raise _fail(f"top level must be an object, got {type(doc).__name__}")
    missing, extra = _TOP - set(doc), set(doc) - _TOP
    if missing:
        raise _fail(f"missing fields {sorted(missing)}")
    if extra:
        raise _fail(f"unknown fields {sorted(extra)[:10]}")
    if doc["format"] != FORMAT:
        raise _fail(f"format is {str(doc['format'])[:40]!r}, expected {FORMAT!r}")
    v = doc["version"]
    if isinstance(v, bool) or not isinstance(v, int) or v != VERSION:
        raise _fail(f"version {repr(v)[:20]} is not supported (this eccokv reads version "
                    f"{VERSION})")
    m = doc["model"]
    if not isinstance(m, Mapping) or set(m) != set(_MODEL):
        raise _fail(f"model must be an object with fields {sorted(_MODEL)}")
    for k, t in _MODEL.items():
        if t is int:
            _int(m[k], f"model.{k}", 1)
        elif not isinstance(m[k], str) or len(m[k]) > 1000:
            raise _fail(f"model.{k} must be a string")
    if not re.fullmatch(r"[0-9a-f]{32}", m["fingerprint"]):
        raise _fail("model.fingerprint must be 32 lower-case hex digits")
    if m["n_heads"] % m["n_kv_heads"]:
        raise _fail(f"model.n_heads {m['n_heads']} is not a multiple of n_kv_heads "
                    f"{m['n_kv_heads']}")
    if config is not None:
        mine = _model_block(config)
        if mine["fingerprint"] != m["fingerprint"]:
            raise _fail(f"it was calibrated on another model ({m['name']!r}, fingerprint "
                        f"{m['fingerprint']}); this model's fingerprint is "
                        f"{mine['fingerprint']}")
    cal = doc["calibration"]
    if not isinstance(cal, Mapping):
        raise _fail("calibration must be an object")
    try:
        json.dumps(cal, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _fail(f"calibration must be plain JSON with finite numbers ({e})") from None
    _num(doc["reference_nll"], "reference_nll")
    floor = _num(doc["floor"], "floor", 0.0, strict=True)
    L = m["n_layers"]
    rows = doc["streams"]
    if not isinstance(rows, list):
        raise _fail("streams must be a list")
    seen: set[tuple[int, str]] = set()
    for i, r in enumerate(rows):
        what = f"streams[{i}]"
        if not isinstance(r, Mapping) or set(r) != set(_STREAM):
            raise _fail(f"{what} must be an object with fields {list(_STREAM)}")
        layer = _int(r["layer"], f"{what}.layer")
        if layer >= L:
            raise _fail(f"{what}.layer {layer} out of range 0..{L - 1}")
        if r["stream"] not in STREAMS:
            raise _fail(f"{what}.stream must be 'k' or 'v', got {str(r['stream'])[:20]!r}")
        key = (layer, r["stream"])
        if key in seen:
            raise _fail(f"{what}: layer {layer} {r['stream']} appears twice")
        seen.add(key)
        d = _num(r["dnll"], f"{what}.dnll")
        e = _num(r["estimate"], f"{what}.estimate")
        dm = r["dnll_mirror"]
        if dm is not None:
            dm = _num(dm, f"{what}.dnll_mirror")
        want = d if dm is None else 0.5 * (d + dm)
        if abs(e - want) > 1e-9 * max(1.0, abs(e)):
            raise _fail(f"{what}.estimate {e} != " + ("dnll" if dm is None else
                                                      "(dnll + dnll_mirror) / 2") + f" = {want}")
        df = _num(r["dnll_floored"], f"{what}.dnll_floored", floor)
        if abs(df - max(e, floor)) > 1e-9 * max(1.0, abs(df)):
            raise _fail(f"{what}.dnll_floored {df} != max(estimate {e}, floor {floor})")
        b = _num(r["bits"], f"{what}.bits", 0.0, strict=True)
        c = _num(r["c"], f"{what}.c", 0.0, strict=True)
        if abs(c - df * 2.0 ** (2 * b)) > 1e-6 * c:
            raise _fail(f"{what}.c {c} != dnll_floored x 2**(2 bits) = {df * 2.0 ** (2 * b)}")
        for f, need in (("window_dnll", True), ("window_dnll_mirror", dm is not None)):
            wd = r[f]
            if not need:
                if wd is not None:
                    raise _fail(f"{what}.{f} must be null without dnll_mirror")
                continue
            if not isinstance(wd, list) or not wd:
                raise _fail(f"{what}.{f} must be a non-empty list")
            for j, x in enumerate(wd):
                _num(x, f"{what}.{f}[{j}]")
    if len(seen) != 2 * L:
        lack = [(l, s) for l in range(L) for s in STREAMS if (l, s) not in seen]
        raise _fail(f"streams lacks {len(lack)} of the {2 * L} (layer, k/v) streams, e.g. "
                    f"{lack[:4]}")
    shape = (L, m["n_kv_heads"], m["head_dim"])
    q = doc["query_moments"]
    try:
        arr = np.asarray(q, dtype=np.float64) if isinstance(q, (list, np.ndarray)) else None
    except (TypeError, ValueError):  # ragged or non-numeric nested lists
        arr = None
    if arr is None or arr.shape != shape:
        got = "not a numeric nested list" if arr is None else f"shape {arr.shape}"
        raise _fail(f"query_moments must be [n_layers, n_kv_heads, head_dim] = {list(shape)}"
                    f", got {got}")
    if isinstance(q, list) and not _all_numbers(q):
        raise _fail("query_moments must hold numbers only")
    if not np.isfinite(arr).all():
        raise _fail("query_moments holds NaN or Inf")
    if (arr < 0).any():
        raise _fail("query_moments holds negative values (they are second moments)")
    if config is not None:
        mine = _model_block(config)
        if (mine["n_layers"], mine["n_kv_heads"], mine["head_dim"]) != shape:
            raise _fail(f"shapes {list(shape)} differ from the model's")
    out = dict(doc)
    out["query_moments"] = arr
    return out


def _all_numbers(x: Any) -> bool:
    if isinstance(x, list):
        return all(_all_numbers(y) for y in x)
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _rounded(x: float, digits: int = 7) -> float:
    return float(f"{x:.{digits}g}")


def save_allocation(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Validate `data` and write it as JSON to `path` (atomically). Query moments are
    stored with 7 significant digits."""
    from eccokv._paths import write_json_atomic

    doc = validate_allocation(data)
    obj = dict(doc)
    obj["query_moments"] = [[[_rounded(v) for v in row] for row in head]
                            for head in doc["query_moments"].tolist()]
    json.dumps(obj, allow_nan=False)  # nothing non-finite slips into the file
    p = Path(path)
    write_json_atomic(p, obj)
    return p


def _no_constants(name: str) -> Any:
    raise _fail(f"holds the non-JSON constant {name} (numbers must be finite)")


def loads_allocation(text: str | bytes, config: Any = None) -> dict[str, Any]:
    """Parse and validate an allocation file's contents (see `load_allocation`)."""
    if len(text) > MAX_FILE_BYTES:
        raise _fail(f"{len(text)} bytes, more than the {MAX_FILE_BYTES} allowed")
    try:
        doc = json.loads(text, parse_constant=_no_constants)
    except AllocationFileError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _fail(f"not valid JSON ({str(e)[:200]})") from None
    return validate_allocation(doc, config)


def load_allocation(path: str | Path, config: Any = None) -> dict[str, Any]:
    """Read and validate an allocation file; `config` (a model config, or a model): refuse
    a file calibrated on another model. Returns the dict with query_moments as an ndarray.
    Raises AllocationFileError (a ValueError) naming what is wrong."""
    p = Path(path)
    with open(p, "rb") as f:
        blob = f.read(MAX_FILE_BYTES + 1)
    if config is not None:
        config = getattr(config, "config", config)
    return loads_allocation(blob, config)


_SAME = ("corpus", "context", "score", "codec", "codec_config", "estimator", "sink_tokens",
         "residual_length", "exact")


def merge_allocations(*docs: Mapping[str, Any]) -> dict[str, Any]:
    """Pool calibration runs of one model on disjoint windows (e.g. seeds 0 and 1) into one
    allocation: per stream the window lists are joined and dnll, dnll_mirror and the estimate
    are their means (equal tokens per window), the floor is recomputed from the pooled
    estimates, the query moments are averaged weighted by windows. Refuses runs of another
    model, with other settings (`_SAME`) or sharing a window start."""
    if len(docs) < 2:
        raise ValueError("merge_allocations needs two or more allocations")
    ds = [validate_allocation(d) for d in docs]
    first = ds[0]
    for d in ds[1:]:
        if d["model"] != first["model"]:
            raise ValueError("allocations of different models cannot be merged")
        for k in _SAME:
            if d["calibration"].get(k) != first["calibration"].get(k):
                raise ValueError(f"allocations with different calibration {k} cannot be merged")
    starts = [s for d in ds for s in d["calibration"].get("starts", [])]
    if len(starts) != len(set(starts)):
        raise ValueError("the allocations share calibration windows")
    n = [len(d["streams"][0]["window_dnll"]) for d in ds]
    tables = [stream_table(d) for d in ds]
    anti = first["calibration"].get("estimator") == "antithetic"
    frac = float(first["calibration"].get("floor_fraction", DEFAULT_FLOOR_FRACTION))
    rows = []
    for key in sorted(tables[0]):
        rs = [t[key] for t in tables]
        wd = [x for r in rs for x in r["window_dnll"]]
        wm = [x for r in rs for x in r["window_dnll_mirror"]] if anti else None
        d = float(np.mean(wd))
        dm = float(np.mean(wm)) if wm is not None else None
        bits = float(np.average([r["bits"] for r in rs], weights=n))
        rows.append({"layer": key[0], "stream": key[1], "dnll": d, "dnll_mirror": dm,
                     "estimate": d if dm is None else 0.5 * (d + dm), "bits": bits,
                     "window_dnll": wd, "window_dnll_mirror": wm})
    floor = max(1e-9, frac * float(np.mean([max(r["estimate"], 0.0) for r in rows])))
    for r in rows:
        r["dnll_floored"] = max(r["estimate"], floor)
        r["c"] = r["dnll_floored"] * 2.0 ** (2 * r["bits"])
    cal = {k: first["calibration"][k] for k in _SAME if k in first["calibration"]}
    cal.update(windows=int(sum(n)), floor_fraction=frac, starts=sorted(starts),
               merged=[dict(d["calibration"]) for d in ds])
    ref = float(np.average([d["reference_nll"] for d in ds], weights=n))
    moments = sum(w * d["query_moments"] for w, d in zip(n, ds, strict=True)) / sum(n)
    doc = {"format": FORMAT, "version": VERSION, "model": dict(first["model"]),
           "calibration": cal, "reference_nll": ref, "floor": floor,
           "streams": [{k: r[k] for k in _STREAM} for r in rows], "query_moments": moments}
    return validate_allocation(doc)


def packaged_allocation(name: str = "smollm2", config: Any = None) -> dict[str, Any]:
    """The allocation shipped with eccokv for model `name` (src/eccokv/profiles/allocation-
    <name>.json), validated like any file (against `config` when given)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{0,63}", name):
        raise ValueError(f"bad packaged allocation name {name!r}")
    p = Path(__file__).parent / "profiles" / f"allocation-{name}.json"
    if not p.is_file():
        raise FileNotFoundError(f"no packaged allocation for {name!r} ({p})")
    return load_allocation(p, config)


def stream_table(data: Mapping[str, Any]) -> dict[tuple[int, str], dict[str, Any]]:
    """{(layer, "k"|"v"): stream row} of a loaded allocation."""
    return {(int(r["layer"]), r["stream"]): r for r in data["streams"]}


# ------------------------------------------------------------------ whole run, CLI


def run_calibration(model_name: str = "smollm2", out: str | Path | None = None,
                    corpus: str = DEFAULT_CORPUS, windows: int = DEFAULT_WINDOWS,
                    context: int = DEFAULT_CONTEXT, score: int = DEFAULT_SCORE,
                    codec: Any = DEFAULT_CODEC, seed: int = 0, model: Any = None,
                    tokenizer: Any = None, show_progress: bool = False,
                    command: str | None = None) -> dict[str, Any]:
    """Measure sensitivity and query moments of `model_name` (or `model`, `tokenizer`)
    on the same calibration windows, and save them to `out` (if given)."""
    from eccokv import __version__
    from eccokv import models as M

    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = M.load(model_name)
    sens = measure_sensitivity(model, tokenizer, corpus, windows, context, score, codec, seed,
                               show_progress=show_progress)
    wins, _ = calibration_windows(tokenizer, corpus, context + score, windows, seed)
    t1 = time.perf_counter()
    moments = measure_query_moments(model, tokenizer, wins=wins)
    extra = {"query_moments_tokens": int(wins.numel()),
             "query_moments_seconds": time.perf_counter() - t1,
             "total_seconds": time.perf_counter() - t0,
             "command": command or "eccokv.allocation.run_calibration", "eccokv": __version__}
    data = make_allocation(model, sens, moments, extra)
    if out is not None:
        save_allocation(out, data)
    return data


def _add(parser: argparse.ArgumentParser, *flags: str, **kw: Any) -> None:
    """Add an option unless the parser has it already (the `calibrate` parser's --model,
    --out, --seed and --json mean the same here)."""
    try:
        parser.add_argument(*flags, **kw)
    except argparse.ArgumentError:
        pass


def add_cli(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `eccokv calibrate --sensitivity --out FILE` (added to `parser`)."""
    g = parser.add_argument_group("--sensitivity (bit-allocation calibration, JSON output)")
    g.add_argument("--sensitivity", action="store_true",
                   help="measure per-layer K/V sensitivity and query moments instead of "
                        "learning a profile; --out is then a .json allocation file")
    g.add_argument("--sensitivity-codec", default=DEFAULT_CODEC,
                   help="codec compressing one stream at a time")
    g.add_argument("--sensitivity-windows", type=int, default=DEFAULT_WINDOWS)
    g.add_argument("--sensitivity-context", type=int, default=DEFAULT_CONTEXT)
    g.add_argument("--sensitivity-score", type=int, default=DEFAULT_SCORE)
    g.add_argument("--sensitivity-corpus", default=DEFAULT_CORPUS, choices=("wiki", "news"))
    _add(parser, "--model", default="smollm2")
    _add(parser, "--out", required=True)
    _add(parser, "--seed", type=int, default=0)
    _add(parser, "--json", action="store_true")
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Run the --sensitivity mode; prints a summary (or the result as JSON with --json)."""
    import shlex

    command = "eccokv " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    data = run_calibration(args.model, out=args.out, corpus=args.sensitivity_corpus,
                           windows=args.sensitivity_windows, context=args.sensitivity_context,
                           score=args.sensitivity_score, codec=args.sensitivity_codec,
                           seed=args.seed, show_progress=not args.json, command=command)
    if args.json:
        summary = {k: v for k, v in data.items() if k != "query_moments"}
        summary["out"] = str(args.out)
        print(json.dumps(summary, indent=1, default=float))
    else:
        print(to_markdown(data))
        print(f"wrote {args.out} in {data['calibration']['total_seconds']:.0f} s")
    return 0


def spearman(a: Iterable[float], b: Iterable[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    x, y = np.asarray(list(a), float), np.asarray(list(b), float)
    if x.shape != y.shape or x.size < 2:
        raise ValueError("need two equal-length sequences of at least 2 values")

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(v.size)
        r[order] = np.arange(v.size, dtype=float)
        for u in np.unique(v):  # ties: average rank
            m = v == u
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def to_markdown(data: Mapping[str, Any]) -> str:
    """Per-layer table of dnll (raw) for K and V, bits and c."""
    t = stream_table(data)
    L = int(data["model"]["n_layers"])
    cal = data["calibration"]
    lines = [f"Sensitivity of {data['model']['name']} to {cal['codec']} on one stream at a "
             f"time ({cal['windows']} windows of {cal['context']}+{cal['score']} tokens, "
             f"corpus {cal['corpus']}); reference mean NLL {data['reference_nll']:.4f}, "
             f"floor {data['floor']:.2e}", "",
             "| layer | dnll K | dnll V | bits K | bits V | c K | c V |",
             "|---|---|---|---|---|---|---|"]
    for l in range(L):
        k, v = t[(l, "k")], t[(l, "v")]
        lines.append(f"| {l} | {k['dnll']:+.5f} | {v['dnll']:+.5f} | {k['bits']:.3f} | "
                     f"{v['bits']:.3f} | {k['c']:.3g} | {v['c']:.3g} |")
    return "\n".join(lines) + "\n"
