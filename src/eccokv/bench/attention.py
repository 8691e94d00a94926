"""`eccokv bench attention`: one decode step (one query token, batch 1) of attention over a
KV cache, fused kernels on the compressed cache against decode-then-SDPA and torch
attention over the uncompressed cache.

For each layer shape (SmolLM2-135M: 3 KV heads x 64, 9 query heads; a Llama-3-8B-like
layer: 8 x 128, 32 query heads), context length and thread count it times, in the same
run and round-robin (so machine noise hits every path alike), the median of `repeats`
calls after warm-up of:

* fused ecco4 (K and V grouped over tokens), fused int4 / kivi4 / kivi2 (K over tokens,
  V over channels, as KIVI): `eccokv.kernels.attention.fused_attention`;
* decode-then-SDPA (ecco4): decode every chunk to float32, concatenate, torch SDPA
  (`reference_attention(..., sdpa=True)`);
* torch SDPA over the uncompressed cache in float32 and in bfloat16, and matmul-softmax-
  matmul in bfloat16 (eager attention). The query heads of a KV head are folded into one
  [n_rep, D] query block (no repeat_kv copy): the fastest way to run these in torch;
* transformers' `QuantizedCache` (optimum-quanto int4, its defaults: groups of 64, axis 0,
  residual 128) through its own code path: `QuantoQuantizedLayer.update()` with the one new
  token (dequantise the quantised part, concatenate it with the float32 residual and the
  new token) then SDPA as above. The layer holds the same K/V: T - 64 tokens quantised, 63
  in its residual (half its window, the mean fill over a cycle). Every 128 steps it
  re-quantises the whole history (`quanto_int4_flush`, timed too); `quanto_int4` is the
  step plus 1/128 of that flush: what a user pays per layer and step on average.

The cache layout is what `EccoCache` keeps: compressed chunks of `chunk` tokens (whole
128-token groups) and an exact window of `residual` tokens. K/V are synthetic (Gaussian
with per-channel scales and offsets and a few outlier channels, like real keys); time
does not depend on the values except through Ecco's code lengths. The memory floor of each
path is the bytes it must move divided by the read bandwidth measured in the same run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from numba import njit, prange

from eccokv import codecs, provenance
from eccokv.kernels.attention import fused_attention, reference_attention

SHAPES: dict[str, tuple[int, int, int]] = {  # name -> (kv heads, head_dim, query heads)
    "smollm2": (3, 64, 9),
    "llama3-8b": (8, 128, 32),
}
FUSED: tuple[tuple[str, int, int], ...] = (  # codec, K axis, V axis of [Hkv, T, D] chunks
    ("ecco4", 1, 1),
    ("int4", 1, 2),
    ("kivi4", 1, 2),
    ("kivi2", 1, 2),
    ("eb3", 1, 1),  # error-bounded, variable rate (ecco-eb at 3 bits/value)
)
TORCH_PATHS = ("sdpa_fp32", "sdpa_bf16", "eager_bf16")
QUANTO = {"nbits": 4, "axis_key": 0, "axis_value": 0, "q_group_size": 64,
          "residual_length": 128}  # transformers' QuantizedCache defaults (quanto backend)
QUANTO_FILL = 63  # tokens in the QuantizedCache residual before the timed step
# targets (issue #7): fused path / fastest uncompressed torch path, contexts >= 4096
TARGETS = {"fused_ecco4": (1.5, 1.0), "fused_int4": (0.8, None), "fused_kivi4": (0.8, None)}
DEFAULT_CONTEXTS = (1024, 4096, 16384, 32768)


@njit(parallel=True, cache=True)
def _par_sum(a):
    n = a.size
    nch = 64
    per = (n + nch - 1) // nch
    acc = np.zeros(nch)
    for c in prange(nch):
        s = 0.0
        for i in range(c * per, min(n, (c + 1) * per)):
            s += a[i]
        acc[c] = s
    return acc.sum()


def read_bandwidth(threads: int, nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Best-of-`repeats` memory read bandwidth in GB/s: a parallel sum over `nbytes`."""
    numba.set_num_threads(threads)
    a = np.ones(nbytes // 8, dtype=np.float64)
    _par_sum(a)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        _par_sum(a)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def kv_like(hkv: int, t: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic K, V [hkv, t, d] float32: per-channel scales/offsets, outlier channels."""
    g = torch.Generator().manual_seed(seed)
    ks = torch.exp(0.6 * torch.randn(1, 1, d, generator=g))
    ks[..., :: max(1, d // 16)] *= 6.0
    k = torch.randn(hkv, t, d, generator=g) * ks + 0.5 * ks * torch.randn(1, 1, d, generator=g)
    vs = torch.exp(0.3 * torch.randn(1, 1, d, generator=g))
    v = torch.randn(hkv, t, d, generator=g) * vs
    return k, v


def split_cache(x: torch.Tensor, codec: codecs.Codec, axis: int, chunk: int,
                residual: int) -> tuple[list[codecs.Compressed], torch.Tensor]:
    """EccoCache's layout: chunks of `chunk` tokens (whole 128-token groups), then an exact
    window of at least `residual` tokens."""
    T = x.shape[1]
    tc = max(0, (T - residual) // 128 * 128)
    chunks = [codec.encode(x[:, s:min(tc, s + chunk)].contiguous(), axis=axis)
              for s in range(0, tc, chunk)]
    return chunks, x[:, tc:].contiguous()


def quanto_layer(K: torch.Tensor, V: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """A transformers `QuantoQuantizedLayer` (QuantizedCache's layer, quanto int4) holding
    K, V [hkv, T, d] but the last token, filled as a generate() would fill it: a prefill
    of T - 1 - QUANTO_FILL tokens (quantised at once), then QUANTO_FILL one-token steps
    into its residual. Returns it and the last token's K, V [1, hkv, 1, d] for the step."""
    from transformers.cache_utils import QuantoQuantizedLayer

    T = K.shape[1]
    if T < QUANTO_FILL + 2:
        raise ValueError(f"context {T} too short for the QuantizedCache path")
    K4, V4 = K[None], V[None]
    layer = QuantoQuantizedLayer(**QUANTO)
    n0 = T - 1 - QUANTO_FILL
    layer.update(K4[:, :, :n0], V4[:, :, :n0])
    for i in range(n0, T - 1):
        layer.update(K4[:, :, i:i + 1], V4[:, :, i:i + 1])
    return layer, K4[:, :, T - 1:].contiguous(), V4[:, :, T - 1:].contiguous()


def quanto_step(layer: Any, k: torch.Tensor, v: torch.Tensor, q4: torch.Tensor,
                scale: float) -> torch.Tensor:
    """One decode step over a QuantizedCache layer: its `update()` with one new token
    (dequantise, concatenate), then SDPA; the layer's state is put back afterwards so the
    next call sees the same cache."""
    keys, values, n = layer.keys, layer.values, layer.cumulative_length
    kk, vv = layer.update(k, v)
    out = torch.nn.functional.scaled_dot_product_attention(q4, kk, vv, scale=scale)
    layer.keys, layer.values, layer.cumulative_length = keys, values, n
    return out


def quanto_flush(layer: Any, K4: torch.Tensor, V4: torch.Tensor) -> None:
    """What a QuantizedCache layer does every `residual_length` steps: re-quantise the
    whole history, K and V (the concatenation is already part of every step)."""
    layer._quantize(K4.contiguous(), axis=layer.axis_key)
    layer._quantize(V4.contiguous(), axis=layer.axis_value)


def quanto_nbytes(layer: Any) -> int:
    """Bytes of a quanto layer's quantised K and V: their inner tensors (codes, scales,
    shifts)."""
    def inner(t: Any) -> int:
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            return sum(inner(getattr(t, n)) for n in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()

    return inner(layer._quantized_keys) + inner(layer._quantized_values)


def _median_times(fns: dict[str, Callable[[], Any]], repeats: int,
                  warmup: int = 2) -> dict[str, float]:
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():  # round-robin: noise hits every path alike
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def bench_case(shape: str, T: int, threads: Sequence[int], repeats: int, chunk: int,
               residual: int, bandwidth: dict[int, float], seed: int = 0) -> list[dict[str, Any]]:
    """All paths for one layer shape and context length, for each thread count."""
    hkv, d, hq = SHAPES[shape]
    n_rep = hq // hkv
    scale = d ** -0.5
    K, V = kv_like(hkv, T, d, seed)
    q = torch.randn(hq, 1, d, generator=torch.Generator().manual_seed(seed + 1))
    caches = {}
    for name, kax, vax in FUSED:
        codec = codecs.get(name)
        kc, ke = split_cache(K, codec, kax, chunk, residual)
        vc, ve = split_cache(V, codec, vax, chunk, residual)
        caches[name] = (kc, ke, vc, ve)
    Kb, Vb = K.to(torch.bfloat16), V.to(torch.bfloat16)
    qlayer, k_new, v_new = quanto_layer(K, V)
    q4, q4b = q.reshape(1, hkv, n_rep, d), q.reshape(1, hkv, n_rep, d).to(torch.bfloat16)
    K4, V4, K4b, V4b = K[None], V[None], Kb[None], Vb[None]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def eager_bf16() -> torch.Tensor:
        w = torch.matmul(q4b, K4b.transpose(-1, -2)) * scale
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(torch.bfloat16)
        return torch.matmul(w, V4b)

    def payload(cs: list[codecs.Compressed]) -> int:
        return sum(c.payload_nbytes for c in cs)

    rows = []
    for th in threads:
        torch.set_num_threads(th)
        numba.set_num_threads(th)
        fns: dict[str, Callable[[], Any]] = {}
        for name, _, _ in FUSED:
            fns[f"fused_{name}"] = partial(fused_attention, q, *caches[name], scaling=scale,
                                           num_threads=th)
        fns["decode_sdpa_ecco4"] = partial(reference_attention, q, *caches["ecco4"],
                                           scaling=scale, num_threads=th, sdpa=True)
        e_kc, e_ke, e_vc, e_ve = caches["ecco4"]
        fns["sdpa_fp32"] = lambda: sdpa(q4, K4, V4, scale=scale)
        fns["sdpa_bf16"] = lambda: sdpa(q4b, K4b, V4b, scale=scale)
        fns["eager_bf16"] = eager_bf16
        fns["quanto_int4_step"] = partial(quanto_step, qlayer, k_new, v_new, q4, scale)
        fns["quanto_int4_flush"] = partial(quanto_flush, qlayer, K4, V4)
        # sanity: the fused path equals decode-then-SDPA
        ref = fns["decode_sdpa_ecco4"]()
        diff = float((fns["fused_ecco4"]() - ref).abs().max() / ref.abs().max())
        exact = fns["sdpa_fp32"]()
        q_err = float((fns["quanto_int4_step"]() - exact).abs().max() / exact.abs().max())
        t = _median_times(fns, repeats)
        t["quanto_int4"] = (t["quanto_int4_step"]
                            + t["quanto_int4_flush"] / QUANTO["residual_length"])
        # bytes each path must move (reads; decode-then-SDPA also writes and re-reads the
        # float32 copy); the exact window is float32 in the compressed caches
        nbytes: dict[str, int] = {}
        for name, _, _ in FUSED:
            kc, ke, vc, ve = caches[name]
            nbytes[f"fused_{name}"] = payload(kc) + payload(vc) + 4 * (ke.numel() + ve.numel())
        nbytes["decode_sdpa_ecco4"] = (payload(e_kc) + payload(e_vc) + 2 * 4 * 2 * K.numel())
        nbytes["sdpa_fp32"] = 4 * 2 * K.numel()
        nbytes["sdpa_bf16"] = nbytes["eager_bf16"] = 2 * 2 * K.numel()
        # QuantizedCache: its quantised storage and float32 residual read, the float32
        # dequantised copy written and read by the concatenation, whose output is written
        # and read by SDPA
        nbytes["quanto_int4"] = (quanto_nbytes(qlayer) + 4 * 2 * qlayer.keys.numel()
                                 + 4 * 4 * 2 * K.numel())
        fastest_torch = min(TORCH_PATHS, key=lambda k: t[k])
        row: dict[str, Any] = {
            "shape": shape, "kv_heads": hkv, "head_dim": d, "q_heads": hq, "context": T,
            "threads": th, "compressed_tokens": sum(c.shape[1] for c in e_kc),
            "exact_tokens": int(e_ke.shape[1]),
            "ms": {k: 1e3 * v for k, v in t.items()},
            "bytes": nbytes,
            "floor_ms": {k: 1e3 * v / (bandwidth[th] * 1e9) for k, v in nbytes.items()},
            "fastest_torch": fastest_torch,
            "fused_ecco4_over_fastest_torch": t["fused_ecco4"] / t[fastest_torch],
            "fused_int4_over_fastest_torch": t["fused_int4"] / t[fastest_torch],
            "fused_kivi4_over_fastest_torch": t["fused_kivi4"] / t[fastest_torch],
            "fused_ecco4_over_quanto_int4": t["fused_ecco4"] / t["quanto_int4"],
            "fused_eb3_over_fused_ecco4": t["fused_eb3"] / t["fused_ecco4"],
            "fused_kivi4_over_quanto_int4": t["fused_kivi4"] / t["quanto_int4"],
            "quanto_int4_vs_sdpa_fp32_max_rel_diff": q_err,
            "decode_sdpa_over_fused_ecco4": t["decode_sdpa_ecco4"] / t["fused_ecco4"],
            "fused_ecco4_vs_decode_sdpa_max_rel_diff": diff,
            "fused_ecco4_Gvalues_per_s": 2 * K.numel() / t["fused_ecco4"] / 1e9,
        }
        rows.append(row)
    return rows


def environment() -> dict[str, Any]:
    """Shared provenance plus what this benchmark reports on: load and thread settings."""
    env = provenance.environment()
    env.update(load_average_start=list(os.getloadavg()), numba_threading_layer=None,
               numba_max_threads=numba.config.NUMBA_NUM_THREADS,
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY"))
    return env


def run(contexts: Sequence[int] = DEFAULT_CONTEXTS, threads: Sequence[int] = (1, 2),
        shapes: Sequence[str] = tuple(SHAPES), repeats: int = 7, chunk: int = 1024,
        residual: int = 128, out_dir: str | Path | None = "benchmarks", progress: bool = True,
        command: str | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result dict and writes attention.{json,md,png}."""
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    if chunk <= 0 or chunk % 128 or residual < 0 or repeats < 1:
        raise ValueError("chunk must be a positive multiple of 128, residual >= 0, repeats >= 1")
    env = environment()
    command = command or "eccokv bench attention"
    if env["OMP_WAIT_POLICY"] and "OMP_WAIT_POLICY" not in command:
        command = f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']} {command}"
    t_start = time.perf_counter()
    bw = {th: read_bandwidth(th) for th in threads}
    env["numba_threading_layer"] = numba.threading_layer()
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        for T in contexts:
            if progress:
                print(f"bench attention: {shape} context {T} ...", file=sys.stderr, flush=True)
            rows += bench_case(shape, T, threads, repeats, chunk, residual, bw)
    env["load_average_end"] = list(os.getloadavg())
    result = {
        "benchmark": "attention",
        "command": command,
        "what": "one decode step (1 query token, batch 1) of one attention layer; median of "
                f"{repeats} calls after 2 warm-up calls, paths interleaved round-robin",
        "data": "synthetic K/V: Gaussian with per-channel log-normal scales, channel offsets "
                "and outlier channels (x6 every 16th channel)",
        "cache_layout": {"chunk_tokens": chunk, "exact_window_tokens": residual},
        "quantized_cache": {"backend": "quanto", **QUANTO, "residual_tokens_held": QUANTO_FILL,
                            "dtype": "float32"},
        "environment": env,
        "read_bandwidth_GBps": {str(k): v for k, v in bw.items()},
        "seconds": time.perf_counter() - t_start,
        "rows": rows,
    }
    if out_dir is not None:
        write_reports(result, Path(out_dir))
    return result


PATH_ORDER = ("fused_ecco4", "fused_eb3", "fused_int4", "fused_kivi4", "fused_kivi2",
              "decode_sdpa_ecco4", "quanto_int4", "sdpa_fp32", "sdpa_bf16", "eager_bf16")


def ratio_range(rows: Sequence[dict[str, Any]], key: str) -> tuple[float, float]:
    """(min, max) of a ratio field over rows."""
    v = [r[key] for r in rows]
    return min(v), max(v)


def target_text(lo: float, hi: float, target: float, goal: float | None = None,
                at_least: bool = False) -> str:
    """'a .. b (target <= t: met|missed[, by x .. y]; goal <= g: met|missed)' for a ratio
    range; `at_least` for targets that are lower bounds."""
    op = ">=" if at_least else "<="
    worst = lo if at_least else hi

    def ok(limit: float) -> bool:
        return worst >= limit if at_least else worst <= limit

    text = f"{lo:.2f} .. {hi:.2f} (target {op} {target:g}: {'met' if ok(target) else 'missed'}"
    if not ok(target):
        text += (f", by {target / hi:.1f}x .. {target / lo:.1f}x" if at_least
                 else f", by {lo / target:.1f}x .. {hi / target:.1f}x")
    if goal is not None:
        text += f"; goal {op} {goal:g}: {'met' if ok(goal) else 'missed'}"
    return text + ")"


def target_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The targets section: ratios over the rows with contexts >= 4096."""
    long = [r for r in rows if r["context"] >= 4096]
    if not long:
        return []
    lines = ["## Targets (contexts >= 4096, every shape and thread count of this run)", ""]
    for path, (target, goal) in TARGETS.items():
        lo, hi = ratio_range(long, f"{path}_over_fastest_torch")
        lines.append(f"- {path.replace('_', ' ')} / fastest uncompressed torch path: "
                     + target_text(lo, hi, target, goal))
    lo, hi = ratio_range(long, "decode_sdpa_over_fused_ecco4")
    lines.append("- decode-then-SDPA / fused ecco4: " + target_text(lo, hi, 2.0, at_least=True))
    lo, hi = ratio_range(long, "fused_eb3_over_fused_ecco4")
    lines.append("- fused eb3 (variable rate) / fused ecco4: " + target_text(lo, hi, 1.25))
    for path in ("fused_ecco4", "fused_kivi4"):
        lo, hi = ratio_range(long, f"{path}_over_quanto_int4")
        lines.append(f"- {path.replace('_', ' ')} / transformers QuantizedCache (quanto int4, "
                     f"step + flush/128): {lo:.2f} .. {hi:.2f} (below 1: faster)")
    lines += ["- fused ecco4 throughput: " + ", ".join(
        f"{r['shape']} {r['context']} {r['threads']}t "
        f"{r['fused_ecco4_Gvalues_per_s']:.2f}" for r in long) + " G values/s", ""]
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    """The Markdown report of a `run()` result."""
    env = result["environment"]
    lines = [
        "# Decode-step attention over a compressed KV cache",
        "",
        f"Command: `{result['command']}`  ",
        f"CPU: {env['cpu']} ({env['cpu_count']} logical CPUs), threading layer "
        f"{env['numba_threading_layer']}, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}, load "
        f"average {env['load_average_start'][0]:.1f} at start / "
        f"{env.get('load_average_end', [0])[0]:.1f} at end (machine shared)  ",
        f"Versions: torch {env['packages']['torch']}, numba {env['packages']['numba']}, "
        f"numpy {env['packages']['numpy']}, "
        f"transformers {env['packages'].get('transformers')}, optimum-quanto "
        f"{env['packages'].get('optimum-quanto')}, python {env['python']}  ",
        provenance.header_line(env),
        f"What: {result['what']}; {result['data']}; cache = chunks of "
        f"{result['cache_layout']['chunk_tokens']} tokens + "
        f"{result['cache_layout']['exact_window_tokens']}-token exact window.  ",
        "Read bandwidth (same run): " + ", ".join(
            f"{k} thread(s) {v:.1f} GB/s" for k, v in result["read_bandwidth_GBps"].items()),
        "",
        "Times in ms. Ratios: fused ecco4 / fastest uncompressed torch path (target <= 1.5, "
        "goal <= 1.0), fused int4 and kivi4 / fastest torch path (target <= 0.8), fused "
        "ecco4 / QuantizedCache and decode-then-SDPA / fused ecco4 (target >= 2). "
        "quanto_int4: transformers' QuantizedCache (optimum-quanto int4) update() + SDPA, plus "
        "1/128 of its every-128-steps re-quantisation. Floor: bytes the path must move / "
        "read bandwidth.",
        "",
        "| shape | context | threads | " + " | ".join(PATH_ORDER)
        + " | fused ecco4 / fastest torch | fused int4 / fastest torch | fused kivi4 / "
          "fastest torch | fused ecco4 / quanto int4 | dec+SDPA / fused ecco4 | "
          "floor fused ecco4 | floor sdpa fp32 |",
        "|---|---|---|" + "---|" * len(PATH_ORDER) + "---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ms = r["ms"]
        cells = [f"{ms[k]:.2f}" for k in PATH_ORDER]
        lines.append(
            f"| {r['shape']} ({r['kv_heads']}x{r['head_dim']}, {r['q_heads']} q) | "
            f"{r['context']} | {r['threads']} | " + " | ".join(cells)
            + f" | {r['fused_ecco4_over_fastest_torch']:.2f} ({r['fastest_torch']}) | "
              f"{r['fused_int4_over_fastest_torch']:.2f} | "
              f"{r['fused_kivi4_over_fastest_torch']:.2f} | "
              f"{r['fused_ecco4_over_quanto_int4']:.2f} | "
              f"{r['decode_sdpa_over_fused_ecco4']:.2f} | {r['floor_ms']['fused_ecco4']:.3f} | "
              f"{r['floor_ms']['sdpa_fp32']:.3f} |")
    lines += ["", "Fused ecco4 equals decode-then-SDPA to max relative difference "
              + f"{max(r['fused_ecco4_vs_decode_sdpa_max_rel_diff'] for r in result['rows']):.2g}"
              + " (all rows); QuantizedCache (int4) differs from exact float32 SDPA by max "
              + "relative "
              + f"{max(r['quanto_int4_vs_sdpa_fp32_max_rel_diff'] for r in result['rows']):.2g}."
              + " QuantizedCache step alone / its flush (ms): " + ", ".join(
                  f"{r['shape']} {r['context']} {r['threads']}t {r['ms']['quanto_int4_step']:.2f}"
                  f" / {r['ms']['quanto_int4_flush']:.2f}" for r in result["rows"]), ""]
    load = max(env["load_average_start"][0], env.get("load_average_end", [0])[0])
    if load > env["cpu_count"]:
        lines += [f"Note: the machine was shared (load average up to {load:.1f} on "
                  f"{env['cpu_count']} CPUs), so a second thread mostly waited for a CPU: "
                  "compare paths within a row, not 1 against 2 threads.", ""]
    lines += target_lines(result["rows"])
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """ms per step against context, one panel per shape and thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(len(threads), len(shapes), figsize=(6 * len(shapes),
                                                                  4.2 * len(threads)),
                             squeeze=False)
    styles = {"fused_ecco4": ("C0", "-", "o"), "fused_eb3": ("C8", "-", "h"),
              "fused_int4": ("C1", "-", "s"),
              "fused_kivi4": ("C2", "-", "^"), "fused_kivi2": ("C4", "-", "v"),
              "decode_sdpa_ecco4": ("C3", "--", "x"), "quanto_int4": ("C6", "--", "*"),
              "sdpa_fp32": ("k", ":", "D"),
              "sdpa_bf16": ("0.45", ":", "d"), "eager_bf16": ("C5", ":", "P")}
    for i, th in enumerate(threads):
        for j, sh in enumerate(shapes):
            ax = axes[i][j]
            sel = sorted((r for r in rows if r["shape"] == sh and r["threads"] == th),
                         key=lambda r: r["context"])
            if not sel:
                continue
            x = [r["context"] for r in sel]
            for k in PATH_ORDER:
                c, ls, m = styles[k]
                ax.plot(x, [r["ms"][k] for r in sel], color=c, ls=ls, marker=m, label=k)
            ax.plot(x, [r["floor_ms"]["fused_ecco4"] for r in sel], color="C0", ls="-.",
                    lw=0.8, label="memory floor, ecco4")
            ax.plot(x, [r["floor_ms"]["sdpa_fp32"] for r in sel], color="k", ls="-.", lw=0.8,
                    label="memory floor, fp32")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            r0 = sel[0]
            ax.set_title(f"{sh} ({r0['kv_heads']}x{r0['head_dim']}, {r0['q_heads']} q heads), "
                         f"{th} thread(s)")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("ms per decode step (one layer)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(result: dict[str, Any], out_dir: Path) -> None:
    """attention.json, attention.md and attention.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (out_dir / "attention.md").write_text(to_markdown(result))
    plot(result, out_dir / "attention.png")
