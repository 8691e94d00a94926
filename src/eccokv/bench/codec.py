"""`eccokv bench codec`: rate, error and speed of every codec on real and synthetic K/V.

For each codec and each data set (SmolLM2's K and V from a Wikipedia window, plus
synthetic Gaussian and heavy-tailed data) and each grouping axis ("tokens": groups of
consecutive tokens within one channel, KIVI's key layout; "channels": groups of
consecutive channels of one token, spanning heads), it measures: bits/value with every
byte counted (`len(to_bytes())`), relative RMSE, SNR, max abs error, the Ecco fallback
rate, and encode/decode throughput on 1 and 2 threads; and, in the same run, the
machine's memory-copy bandwidth as the reference limit. It also measures the encoder's
cost relative to a prefill forward pass of the same tokens.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from numba import njit, prange

from eccokv import codecs, provenance

DEFAULT_CODECS = ("none", "fp8", "int4", "int3", "int2", "kivi4", "kivi3", "kivi2", "ecco4",
                  "ecco3", "ecco2", "eb4", "eb3", "eb2", "eb-rel0.05", "eb-abs0.05")


@njit(parallel=True, cache=True)
def _par_copy(src, dst):
    n = src.size
    nch = 64
    per = (n + nch - 1) // nch
    for c in prange(nch):
        lo = c * per
        hi = min(n, lo + per)
        dst[lo:hi] = src[lo:hi]


def memcopy_bandwidth(threads: int, nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Best-of-`repeats` copy bandwidth in GB/s (bytes read + written counted once: n/t)."""
    numba.set_num_threads(threads)
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    _par_copy(src, dst)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        _par_copy(src, dst)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    fn()  # warm-up (JIT compile, page faults)
    best, res = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t0)
    return best, res


def error_metrics(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    x64, y64 = x.double(), y.double()
    err = (y64 - x64).pow(2).mean().item()
    sig = x64.pow(2).mean().item()
    return {
        "rel_rmse": math.sqrt(err / sig) if sig > 0 else 0.0,
        "snr_db": 10 * math.log10(sig / err) if err > 0 else None,  # None: exact
        "max_abs_err": (y64 - x64).abs().max().item(),
    }


def eb_bound_ratio(codec: Any, c: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x - x_hat| / bound over every value of an ecco-eb tensor (<= 1 is the
    guarantee), the bound computed independently: per group of 128 along the axis for
    the relative mode, the chunk's stored bound in target mode."""
    from eccokv.codecs.base import Layout, to_rows

    lay = Layout(tuple(x.shape), c.axis, 128)
    err = to_rows((y.double() - x.double()).abs(), lay)
    if codec.bound_mode == "relative" and codec.target_bits is None:
        g = to_rows(x, lay)
        n = np.full(lay.nblocks, 128)
        n[lay.ngroups - 1::lay.ngroups] = lay.length - (lay.ngroups - 1) * 128
        valid = np.arange(128)[None, :] < n[:, None]
        rng = (np.where(valid, g, -np.inf).max(1) - np.where(valid, g, np.inf).min(1))
        bnd = codec.bound * rng.astype(np.float64)
    else:
        bnd = np.full(lay.nblocks, float(c.arrays["params"][1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(bnd[:, None] > 0, err / bnd[:, None], np.where(err > 0, np.inf, 0.0))
    return float(r.max()) if r.size else 0.0


def layouts(x: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """x: [layers, kv_heads, tokens, head_dim] -> {"tokens": (x, 2), "channels": (x', -1)}."""
    L, H, T, D = x.shape
    return {
        "tokens": (x, 2),
        "channels": (x.permute(0, 2, 1, 3).reshape(L, T, H * D).contiguous(), -1),
    }


def bench_one(codec_name: str, x: torch.Tensor, axis: int, threads: Sequence[int],
              repeats: int) -> dict[str, Any]:
    codec = codecs.get(codec_name)
    reset = getattr(codec, "reset_stats", None)
    if reset:
        reset()
    c = codec.encode(x, axis=axis)
    st = codec.stats()
    y = codec.decode(c)
    row: dict[str, Any] = {
        "codec": codec_name,
        "config": codec.get_config(),
        "bits_per_value": c.bits_per_value,
        "nbytes": c.nbytes,
        **error_metrics(x, y),
        "fallback_rate": st.get("fallback_rate"),
    }
    if c.codec_config.get("id") == "ecco-eb":
        row["max_err_over_bound"] = eb_bound_ratio(codec, c, x, y)
    out = torch.empty_like(x)
    for th in threads:
        numba.set_num_threads(th)
        torch.set_num_threads(th)
        te, _ = _timed(lambda: codec.encode(x, axis=axis), repeats)
        td, _ = _timed(lambda: codec.decode(c, out=out), repeats)
        row[f"encode_Mvals_s_{th}t"] = x.numel() / te / 1e6
        row[f"decode_Mvals_s_{th}t"] = x.numel() / td / 1e6
        if hasattr(codec, "kernel_tables"):
            # the serial Huffman pass alone (decode core phase 1) vs the whole decode
            from eccokv.kernels.ecco_numba import symbols_pass

            nb = (c.arrays["blocks"].size - 1) // (codec.block_bytes // 8)
            kt = codec.kernel_tables()
            ts, _ = _timed(lambda nb=nb, kt=kt: symbols_pass(c.arrays["blocks"], nb, kt),
                           repeats)
            row[f"huffman_share_{th}t"] = ts / td
    return row


def synthetic(seed: int = 0, shape: tuple[int, ...] = (4, 4, 1024, 128)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(shape, generator=g)
    t3 = torch.distributions.StudentT(3.0).sample(shape)
    # channel outliers, as in real keys: a few channels 8x larger
    scale = torch.ones(shape[-1])
    scale[:: max(1, shape[-1] // 8)] = 8.0
    return {"gauss": gauss, "student_t3_outlier_channels": t3 * scale}


def encoder_prefill_cost(model: Any, ids: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]],
                         codec_name: str, axis: int, threads: int) -> dict[str, float]:
    """Time of encoding every layer's K and V vs. the prefill forward of the same tokens."""
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    codec = codecs.get(codec_name)

    def prefill() -> None:
        with torch.no_grad():
            model(ids, use_cache=True)

    def encode_all() -> None:
        for k, v in kv:
            codec.encode(k, axis=axis)
            codec.encode(v, axis=axis)

    tp, _ = _timed(prefill, 2)
    te, _ = _timed(encode_all, 2)
    return {"prefill_s": tp, "encode_s": te, "encode_fraction_of_prefill": te / tp,
            "tokens": int(ids.shape[1]), "threads": threads}


def run(model_name: str = "smollm2", tokens: int = 2048,
        codec_names: Sequence[str] = DEFAULT_CODECS,
        threads: Sequence[int] = (1, 2), repeats: int = 3, with_synthetic: bool = True,
        out_dir: str | Path | None = "benchmarks", progress: bool = True,
        command: str | None = None) -> dict[str, Any]:
    """Run the whole benchmark; returns the result dict and writes JSON + Markdown."""
    from tqdm import tqdm

    from eccokv import models
    from eccokv.hf.capture import kv_samples

    model, tok = models.load(model_name)
    kv = kv_samples(model, tok, corpus="wiki", tokens=tokens)
    K = torch.cat([k for k, _ in kv], dim=0)  # [layers, kv_heads, tokens, head_dim]
    V = torch.cat([v for _, v in kv], dim=0)
    data = {"smollm2_K": K, "smollm2_V": V}
    if with_synthetic:
        data.update(synthetic())
    bw = {f"{t}t": memcopy_bandwidth(t) for t in threads}
    src = np.ones(1 << 25)
    dst = np.empty_like(src)
    bw["numpy_copyto_1t"] = src.nbytes / _timed(lambda: np.copyto(dst, src), 5)[0] / 1e9
    rows = []
    jobs = [(d, lay, c) for d in data for lay in ("tokens", "channels") for c in codec_names]
    for dname, lay, cname in tqdm(jobs, desc="bench codec", disable=not progress):
        x, axis = layouts(data[dname])[lay]
        r = bench_one(cname, x, axis, threads, repeats)
        r.update({"data": dname, "grouping": lay, "numel": x.numel()})
        rows.append(r)
    ids = torch.as_tensor(
        __import__("eccokv.data", fromlist=["token_windows"]).token_windows(
            tok, "wiki", window=tokens, n=1))
    cost = {f"{t}t": encoder_prefill_cost(model, ids, kv, "ecco4", 2, t) for t in threads}
    result = {
        "benchmark": "codec",
        "command": command or "eccokv bench codec",
        "model": model_name,
        "data": f"wiki, one window of {tokens} tokens (SmolLM2 K/V of all layers); synthetic",
        "environment": environment(),
        "memcopy_GBps": bw,
        "encoder_vs_prefill": cost,
        "rows": rows,
    }
    if out_dir is not None:
        write_reports(result, Path(out_dir))
    return result


def environment() -> dict[str, Any]:
    """Provenance of a benchmark result (see `eccokv.provenance`)."""
    return provenance.environment()


def best_axis(rows: list[dict[str, Any]], data: str, codec: str) -> dict[str, Any]:
    cands = [r for r in rows if r["data"] == data and r["codec"] == codec]
    return min(cands, key=lambda r: r["rel_rmse"])


def to_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    th = sorted({k.rsplit("_", 1)[1] for r in rows for k in r if k.startswith("decode_Mvals")})
    lines = [
        "# Codec benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"Model: {result['model']}; data: {result['data']}  ",
        provenance.header_line(result["environment"]),
        f"Environment: {json.dumps(result['environment'])}",
        "",
        "Memory-copy bandwidth measured in the same run (the limit for any decoder): "
        + ", ".join(f"{k}: {v:.1f} GB/s" for k, v in result["memcopy_GBps"].items()),
        "",
        "## Best grouping axis per codec (real SmolLM2 K and V)",
        "",
        "| data | codec | grouping | bits/value | rel RMSE | SNR dB | max abs err | fallback |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in sorted({r["data"] for r in rows}):
        for c in dict.fromkeys(r["codec"] for r in rows):
            r = best_axis(rows, d, c)
            fb = "" if r["fallback_rate"] is None else f"{100 * r['fallback_rate']:.3f}%"
            snr = "exact" if r["snr_db"] is None else f"{r['snr_db']:.2f}"
            lines.append(f"| {d} | {c} | {r['grouping']} | {r['bits_per_value']:.4f} | "
                         f"{r['rel_rmse']:.4f} | {snr} | {r['max_abs_err']:.4g} | {fb} |")
    lines += ["", "## All rows (throughput in M values/s; decode writes float32)", "",
              "| data | grouping | codec | bits/value | rel RMSE | "
              + " | ".join(f"enc {t} | dec {t}" for t in th) + " |",
              "|---|---|---|---|---|" + "---|---|" * len(th)]
    for r in rows:
        sp = " | ".join(f"{r[f'encode_Mvals_s_{t}']:.1f} | {r[f'decode_Mvals_s_{t}']:.1f}"
                        for t in th)
        lines.append(f"| {r['data']} | {r['grouping']} | {r['codec']} | "
                     f"{r['bits_per_value']:.4f} | {r['rel_rmse']:.4f} | {sp} |")
    eb = [r for r in rows if "max_err_over_bound" in r]
    if eb:
        worst = max(r["max_err_over_bound"] for r in eb)
        lines += ["", "## ecco-eb: the error bound on every value (max |x - x_hat| / bound; "
                  f"<= 1 is guaranteed; worst here {worst:.4f}: "
                  f"{'held' if worst <= 1 else 'BROKEN'})", "",
                  "| data | grouping | codec | bits/value | max err / bound |",
                  "|---|---|---|---|---|"]
        for r in eb:
            lines.append(f"| {r['data']} | {r['grouping']} | {r['codec']} | "
                         f"{r['bits_per_value']:.4f} | {r['max_err_over_bound']:.4f} |")
    ecco = [r for r in rows if r["codec"].startswith("ecco") and r["data"].startswith("smollm2")]
    if ecco:
        lines += ["", "## Ecco decode speed (real K/V; G values/s, float32 output; target >= 1.2 "
                  "on one core on either grouping axis, goal 2.0)", "",
                  "| data | grouping | codec | " + " | ".join(
                      f"dec {t} G/s | Huffman pass share {t}" for t in th) + " |",
                  "|---|---|---|" + "---|---|" * len(th)]
        for r in ecco:
            sp = " | ".join(f"{r[f'decode_Mvals_s_{t}'] / 1e3:.2f} | "
                            f"{100 * r.get(f'huffman_share_{t}', float('nan')):.0f}%" for t in th)
            lines.append(f"| {r['data']} | {r['grouping']} | {r['codec']} | {sp} |")
        one = [r["decode_Mvals_s_1t"] / 1e3 for r in ecco if r["codec"] == "ecco4"
               and "decode_Mvals_s_1t" in r]
        if one:
            lines += ["", f"ecco4 on one core: {min(one):.2f} .. {max(one):.2f} G values/s "
                      f"(target >= 1.2: {'met' if min(one) >= 1.2 else 'NOT met'})."]
    lines += ["", "## Encoder cost vs prefill (ecco4, token grouping, all layers' K and V)", "",
              "| threads | prefill s | encode s | encode / prefill |", "|---|---|---|---|"]
    for k, v in result["encoder_vs_prefill"].items():
        lines.append(f"| {k} | {v['prefill_s']:.3f} | {v['encode_s']:.3f} | "
                     f"{100 * v['encode_fraction_of_prefill']:.1f}% |")
    return "\n".join(lines) + "\n"


def write_reports(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "codec.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (out_dir / "codec.md").write_text(to_markdown(result))
