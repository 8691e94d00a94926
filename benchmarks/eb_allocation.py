"""Which bit allocations help the variable-rate cache (issue 8, "bit allocation where it
pays"): the eval ppl protocol (same seeded windows, paired bootstrap) over ecco-eb at 3
bits/value with

- uniform: every stream (layer x K/V) at 3.0 (`EccoCache(config, target_bits=3.0)`);
- K/V split: keys 3.5, values 2.5 (and the reverse);
- attention-aware keys: each key channel's bound x (E[q_c^2] / geomean)^-1/2 from the
  packaged SmolLM2 calibration's post-RoPE query moments (score error ~ sum_c E[q_c^2]
  err_c^2, so equal marginal cost gives bounds ~ E[q_c^2]^-1/2);
- per-layer allocation: `eccokv.allocation.allocate` from the calibrated sensitivities
  (loss increase per stream), with and without the attention-aware keys.

Run: `python benchmarks/eb_allocation.py [--windows 8] [--residual 128]`; writes
benchmarks/eb_allocation.{json,md} (source digest included).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

import eccokv  # noqa: F401  (runtime settings before torch)
from eccokv import allocation as AL
from eccokv import provenance
from eccokv.eval import common as E
from eccokv.eval import ppl
from eccokv.hf.cache import EccoCache
from eccokv.hf.spec import LayerSpec, stream


def eb(bits: float) -> dict[str, Any]:
    return {"id": "ecco-eb", "target_bits": float(bits)}


def layers_for(config: Any, kind: str, target: float) -> dict[int, LayerSpec]:
    data = AL.packaged_allocation("smollm2", config)
    qm = np.asarray(data["query_moments"])
    alloc = (AL.allocate(AL.sensitivities(data), target, AL.stream_sizes(config))
             if kind.startswith("alloc") else None)
    out = {}
    for layer in range(qm.shape[0]):
        kb = alloc[(layer, "k")] if alloc else target
        vb = alloc[(layer, "v")] if alloc else target
        rs = (AL.channel_weights(qm, layer).reshape(-1) ** -0.5
              if kind in ("keys", "alloc+keys") else None)
        out[layer] = LayerSpec(stream(eb(kb), "tokens", row_scale=rs), stream(eb(vb), "tokens"))
    return out


VARIANTS = {  # cache name (no "+" or "@": the eval parses those) -> builder(config, residual)
    "eb3-uniform": lambda c, r: EccoCache(c, target_bits=3.0, residual_length=r),
    "eb3-K3.5-V2.5": lambda c, r: EccoCache(c, key_codec=eb(3.5), value_codec=eb(2.5),
                                            residual_length=r),
    "eb3-K2.5-V3.5": lambda c, r: EccoCache(c, key_codec=eb(2.5), value_codec=eb(3.5),
                                            residual_length=r),
    "eb3-attention-keys": lambda c, r: EccoCache(c, layers=layers_for(c, "keys", 3.0),
                                                       residual_length=r),
    "eb3-layer-allocation": lambda c, r: EccoCache(c, layers=layers_for(c, "alloc", 3.0),
                                                       residual_length=r),
    "eb3-layer-allocation-keys": lambda c, r: EccoCache(c, layers=layers_for(c, "alloc+keys", 3.0),
                                                    residual_length=r),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--out-dir", default="benchmarks")
    a = ap.parse_args(argv)
    real = E.make_cache

    def make(name: str, config: Any, residual: int, fused: bool | None = None) -> Any:
        return VARIANTS[name](config, residual) if name in VARIANTS else real(
            name, config, residual, fused)

    E.make_cache = make  # the protocol builds caches by name
    try:
        res = ppl.run(codecs=["ecco4", *VARIANTS], windows=a.windows, residuals=[a.residual],
                      out_dir=None, show_progress=False,
                      command="python benchmarks/eb_allocation.py " + " ".join(argv or
                                                                                sys.argv[1:]))
    finally:
        E.make_cache = real
    rows = res["settings"][0]["rows"]
    lines = ["# Bit allocation for the variable-rate cache (ecco-eb, 3 bits/value)", "",
             *E.provenance_lines(res), provenance.header_line(res["environment"]), "",
             f"{a.windows} windows of the eval ppl protocol, residual {a.residual}; "
             "change of perplexity vs the uncompressed cache, paired bootstrap 5-95%.", "",
             "| cache | bits/value | ppl change | interval | windows worse |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "rel_change_pct" not in r or r["name"] == "none":
            continue
        lines.append(f"| {r['name']} | {r['bits']['compressed_bits_per_value']:.3f} | "
                     f"{r['rel_change_pct']:+.3f}% | [{r['ci_low_pct']:+.3f}, "
                     f"{r['ci_high_pct']:+.3f}] | {r['windows_worse']}/{r['windows']} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if a.out_dir:
        E.write_reports(res, md, a.out_dir, "eb_allocation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
