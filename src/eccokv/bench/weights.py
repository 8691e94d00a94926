"""`eccokv bench weights`: the compressed Linear kernels against torch's, per token count.

For each weight shape and each number of input rows T (1 = a decode step, more = a
verification batch or a prefill), the median time of:
- `fp32` / `bf16`: nn.Linear with the plain weight (torch's GEMV / GEMM);
- `fused`: EccoLinear's fused decode-GEMV (W read from its blocks, never written out);
- `tiled`: EccoLinear's prefill path (decode tiles into a reused buffer, then matmul).
Each timing cycles over enough distinct layers that their weights (fp32: > 256 MB) do
not stay in the CPU caches, as in a model's forward pass. The cross-over is the smallest
T at which `tiled` beats `fused`; `eccokv.weights.linear.GEMV_MAX_TOKENS` is set from it.
Weights: SmolLM2's real layers (dequantised), and Llama-3-8B-sized Gaussian matrices.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eccokv import provenance

DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64)
SHAPES = {  # name -> (out, in, where the weights come from)
    "smollm2 q/o 576x576": (576, 576, "smollm2:self_attn.q_proj"),
    "smollm2 k/v 192x576": (192, 576, "smollm2:self_attn.k_proj"),
    "smollm2 up 1536x576": (1536, 576, "smollm2:mlp.up_proj"),
    "smollm2 down 576x1536": (576, 1536, "smollm2:mlp.down_proj"),
    "llama3-8b q 4096x4096": (4096, 4096, "gaussian"),
}
WORKING_SET = 256 << 20  # bytes of fp32 weights cycled through per measurement


def _weights(src: str, out: int, inp: int, n: int, model: Any) -> list[torch.Tensor]:
    if src == "gaussian":
        g = torch.Generator().manual_seed(0)
        base = torch.randn(out, inp, generator=g) * 0.02
        base *= 1 + torch.rand(1, inp, generator=g)  # channel scales vary, as in real layers
        return [base] * n  # distinct copies are made by the caller
    path = src.split(":", 1)[1]
    layers = model.model.layers
    return [layers[i % len(layers)].get_submodule(path).weight.detach().float()
            for i in range(n)]


def _median_ms(fn, layers: Sequence[Any], x: torch.Tensor, repeats: int) -> float:
    """Median over `repeats` passes of (pass time / layers), one call per layer."""
    for m in layers[: min(4, len(layers))]:
        fn(m, x)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for m in layers:
            fn(m, x)
        ts.append((time.perf_counter() - t0) / len(layers))
    return 1e3 * statistics.median(ts)


@torch.no_grad()
def run(shapes: Sequence[str] = tuple(SHAPES), tokens: Sequence[int] = DEFAULT_TOKENS,
        codec: str = "ecco4", repeats: int = 5, out_dir: str | Path | None = "benchmarks",
        progress: bool = True, command: str | None = None) -> dict[str, Any]:
    from eccokv.weights import EccoLinear, weight_codec

    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    env = provenance.environment()
    env["load_average_start"] = list(os.getloadavg())
    model = None
    if any(SHAPES[s][2].startswith("smollm2") for s in shapes):
        from eccokv import models

        model, _ = models.load("smollm2")
    cod = weight_codec(codec)
    rows = []
    for name in shapes:
        out, inp, src = SHAPES[name]
        n = max(2, min(64, WORKING_SET // (4 * out * inp)))
        ws = _weights(src, out, inp, n, model)
        fp32, bf16, ecco = [], [], []
        for i, w in enumerate(ws):
            w = w + 0.0 if src == "gaussian" and i else w  # distinct memory per layer
            lin = nn.Linear(inp, out, bias=False)
            lin.weight.data = w.contiguous()
            fp32.append(lin)
            lb = nn.Linear(inp, out, bias=False).to(torch.bfloat16)
            lb.weight.data = w.to(torch.bfloat16)
            bf16.append(lb)
            if i < 2 or src != "gaussian":
                ecco.append(EccoLinear.from_linear(lin, cod))
            else:  # the same blocks, copied: distinct memory without re-encoding
                ecco.append(copy.deepcopy(ecco[i % 2]))
        bits = ecco[0].bits_per_weight
        for T in tokens:
            x = torch.randn(T, inp)
            xb = x.to(torch.bfloat16)
            r: dict[str, Any] = {"shape": name, "out": out, "in": inp, "tokens": T,
                                 "layers_cycled": n, "bits_per_weight": round(bits, 4)}
            r["fp32_ms"] = _median_ms(lambda m, x: m(x), fp32, x, repeats)
            r["bf16_ms"] = _median_ms(lambda m, x: m(x), bf16, xb, repeats)

            def fused(m, x):
                m.gemv_max_tokens = 1 << 30
                return m(x)

            def tiled(m, x):
                m.gemv_max_tokens = 0
                return m(x)

            r["fused_ms"] = _median_ms(fused, ecco, x, repeats)
            r["tiled_ms"] = _median_ms(tiled, ecco, x, repeats)
            r["fused_Gvalues_s"] = out * inp / r["fused_ms"] / 1e6
            r["fused_vs_fp32"] = r["fp32_ms"] / r["fused_ms"]
            r["best_vs_fp32"] = r["fp32_ms"] / min(r["fused_ms"], r["tiled_ms"])
            rows.append(r)
            if progress:
                print(f"{name} T={T}: fp32 {r['fp32_ms']:.3f} bf16 {r['bf16_ms']:.3f} fused "
                      f"{r['fused_ms']:.3f} tiled {r['tiled_ms']:.3f} ms", flush=True)
    cross = {}
    for name in shapes:
        rs = [r for r in rows if r["shape"] == name]
        over = [r["tokens"] for r in rs if r["tiled_ms"] < r["fused_ms"]]
        cross[name] = min(over) if over else None
    env["load_average_end"] = list(os.getloadavg())
    res = {"what": "compressed Linear kernels vs torch, median ms per layer call",
           "codec": cod.get_config(), "command": command or "eccokv bench weights",
           "environment": env, "rows": rows, "crossover_tokens": cross}
    if out_dir:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "weights-kernel.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
        (d / "weights-kernel.md").write_text(to_markdown(res))
    return res


def to_markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    out = ["# Compressed Linear kernels (`eccokv bench weights`)", "",
           f"Command: `{res['command']}`  ",
           f"CPU: {env['cpu']} ({env['cpu_count']} logical CPUs), torch threads "
           f"{env['torch_threads']}, load average {env['load_average_start'][0]:.1f} at start "
           f"/ {env['load_average_end'][0]:.1f} at end (machine shared)  ",
           provenance.header_line(env),
           f"Codec: `{json.dumps(res['codec'])}`. Median ms per layer call, cycling over "
           "distinct layers (fp32 working set > 256 MB, so weights come from memory). "
           "fused = decode-GEMV on the blocks; tiled = decode tiles + matmul (prefill path).",
           "", "| shape | T | bits/w | fp32 ms | bf16 ms | fused ms | tiled ms | fused G/s | "
           "fp32 / best |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['shape']} | {r['tokens']} | {r['bits_per_weight']:.3f} | "
                   f"{r['fp32_ms']:.3f} | {r['bf16_ms']:.3f} | {r['fused_ms']:.3f} | "
                   f"{r['tiled_ms']:.3f} | {r['fused_Gvalues_s']:.2f} | "
                   f"{r['best_vs_fp32']:.2f} |")
    out += ["", "Cross-over (smallest T where tiled beats fused): " + ", ".join(
        f"{k}: {v}" for k, v in res["crossover_tokens"].items()), ""]
    return "\n".join(out)
