"""Is the variable-rate cache's perplexity *gain* closeness to the model, or luck?

At 2.5-3.5 bits/value `rd.md` finds eb caches *below* the uncompressed cache's perplexity
(eb3 -0.83% on 32 windows). A lossy cache can only move the model's predictions away
from the uncompressed ones; whether that move happens to lower the NLL of the text says
little about how far it went. This study measures the distance itself, on the eval ppl
protocol (same seeded windows, exact prefill replayed into every cache, 256 scored
tokens reading the compressed context):

- KL(p_none || p_cache) per scored token, in nats (mean over tokens and windows);
- top-1 agreement with the uncompressed cache's next-token prediction;
- the perplexity change, as in `eccokv eval ppl`.

Spread: paired bootstrap over windows (2000 resamples, 5-95%) of each cache's mean KL
and of its difference to ecco4's.

Caches are `eccokv eval ppl` names (eb3 = `EccoCache(config, target_bits=3.0)`) or the
bit-allocation variants of `eb_allocation.py` (`--caches eb3-attention-keys,...`).

Run: `python benchmarks/eb_kl.py [--windows 32] [--residual 128,0] [--caches ...]
[--out-name eb_kl]`; writes
benchmarks/<out-name>.{json,md} (source digest included).
"""

from __future__ import annotations  # noqa: I001  (eccokv before torch)

import argparse
import sys
import time
from typing import Any

import numpy as np

import eccokv  # noqa: F401  (runtime settings before torch)
import torch

from eccokv import data, models, provenance
from eccokv.eval import common as E
from eccokv.eval import ppl

CACHES = ("ecco4", "ecco3", "eb2.5", "eb3", "eb3.5", "eb4", "int4", "kivi4", "kivi3")


def _variants() -> dict[str, Any]:
    """The bit-allocation variants of `eb_allocation.py` (same folder), by name."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "eb_allocation", Path(__file__).with_name("eb_allocation.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return dict(mod.VARIANTS)


VARIANTS = _variants()  # e.g. eb3-attention-keys, eb3-K3.5-V2.5


@torch.no_grad()
def log_probs(model: Any, ids: torch.Tensor, context: int, cache: Any,
              pre: tuple[Any, torch.Tensor]) -> torch.Tensor:
    """Log-probabilities [score, vocab] (float64) of the scored positions, ppl protocol."""
    kv, last = pre
    E.replay(cache, kv)
    out = model(ids[:, context:], past_key_values=cache, use_cache=True).logits[0].float()
    logits = torch.cat([last[None], out[:-1]], dim=0)
    return torch.log_softmax(logits.double(), dim=-1)


def boot(x: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """5-95% of the mean of x [windows] over bootstrap resamples of the windows."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n, x.shape[0]))
    m = x[idx].mean(axis=1)
    return float(np.percentile(m, 5)), float(np.percentile(m, 95))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--residual", default="128,0")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--caches", default=",".join(CACHES))
    ap.add_argument("--out-dir", default="benchmarks")
    ap.add_argument("--out-name", default="eb_kl")
    a = ap.parse_args(argv)
    residuals = [int(r) for r in a.residual.split(",")]
    names = [n for n in a.caches.split(",") if n]
    t0 = time.perf_counter()
    env = E.environment()
    model, tok = models.load("smollm2")
    context, score = ppl.DEFAULT_CONTEXT, 256
    wins = data.token_windows(tok, "wiki", window=context + score, n=a.windows, seed=a.seed)
    vpt = E.values_per_token(model)
    # per residual, per cache: per-window mean KL, top-1 agreement, mean NLL; bits
    res: dict[int, dict[str, dict[str, Any]]] = {
        r: {n: {"kl": [], "top1": [], "nll": [], "bits": None} for n in ["none", *names]}
        for r in residuals}
    for w in range(wins.shape[0]):
        ids = wins[w:w + 1]
        pre = E.exact_prefill(model, ids[:, :context])
        target = ids[0, context:]
        ref = log_probs(model, ids, context, E.make_cache("none", model.config, 0), pre)
        ref_top = ref.argmax(-1)
        ref_nll = float(-ref.gather(1, target[:, None]).mean())
        for r in residuals:
            res[r]["none"]["nll"].append(ref_nll)
            for n in names:
                cache = (VARIANTS[n](model.config, r) if n in VARIANTS
                         else E.make_cache(n, model.config, r))
                lp = log_probs(model, ids, context, cache, pre)
                row = res[r][n]
                if row["bits"] is None:
                    row["bits"] = E.cache_bits(cache, vpt).as_dict()
                row["kl"].append(float((ref.exp() * (ref - lp)).sum(-1).mean()))
                row["top1"].append(float((lp.argmax(-1) == ref_top).double().mean()))
                row["nll"].append(float(-lp.gather(1, target[:, None]).mean()))
        print(f"window {w + 1}/{wins.shape[0]} done ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    settings = []
    for r in residuals:
        rows = []
        ref_nll = np.asarray(res[r]["none"]["nll"])
        base_kl = np.asarray(res[r]["ecco4"]["kl"]) if "ecco4" in names else None
        for n in names:
            row = res[r][n]
            kl = np.asarray(row["kl"])
            nll = np.asarray(row["nll"])
            rel = E.paired_rel_change(nll, ref_nll)["rel_change_pct"]
            out = {"name": n, "bits_per_value": row["bits"]["compressed_bits_per_value"],
                   "kl_mean": float(kl.mean()), "kl_ci": boot(kl),
                   "top1": float(np.mean(row["top1"])), "ppl_change_pct": float(rel),
                   "window_kl": row["kl"], "window_top1": row["top1"], "window_nll": row["nll"]}
            if base_kl is not None:
                d = kl - base_kl
                out["kl_minus_ecco4"] = float(d.mean())
                out["kl_minus_ecco4_ci"] = boot(d)
            rows.append(out)
        settings.append({"residual": r, "rows": rows,
                         "reference_window_nll": res[r]["none"]["nll"]})
    cmd = "python benchmarks/eb_kl.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"evaluation": "eb_kl", "command": cmd.strip(), "model": E.model_block(model),
              "data": {"corpus": "wiki", "windows": a.windows, "context": context,
                       "score": score, "seed": a.seed,
                       "windows_sha256_16": E.tensor_digest(wins),
                       "description": f"{a.windows} windows of {context}+{score} tokens from "
                                      f"corpus 'wiki' (eccokv.data.token_windows, seed {a.seed})"},
              "environment": env, "settings": settings,
              "seconds": time.perf_counter() - t0}
    lines = ["# Distance to the uncompressed model: KL divergence per scored token", "",
             *E.provenance_lines(result), provenance.header_line(env), "",
             "The eval ppl protocol (exact prefill replayed into each cache, 256 scored tokens "
             "reading the compressed context). KL = KL(p_none || p_cache) in nats per scored "
             "token, mean over tokens and windows; [5%, 95%]: paired bootstrap over windows. "
             "top-1: share of scored positions where the cache's most likely next token is "
             "the uncompressed cache's. A lower KL is closer to the uncompressed model; a "
             "negative perplexity change is not.", ""]
    for s in settings:
        lines += [f"## Residual window {s['residual']} tokens", "",
                  "| cache | bits/value | KL (nats) [5%, 95%] | KL - ecco4's [5%, 95%] "
                  "| top-1 agreement | ppl change |",
                  "|---|---|---|---|---|---|"]
        for o in sorted(s["rows"], key=lambda o: o["bits_per_value"]):
            dd = (f"{o['kl_minus_ecco4']:+.5f} [{o['kl_minus_ecco4_ci'][0]:+.5f}, "
                  f"{o['kl_minus_ecco4_ci'][1]:+.5f}]" if "kl_minus_ecco4" in o else "-")
            lines.append(f"| {o['name']} | {o['bits_per_value']:.3f} | {o['kl_mean']:.5f} "
                         f"[{o['kl_ci'][0]:.5f}, {o['kl_ci'][1]:.5f}] | {dd} | "
                         f"{o['top1'] * 100:.2f}% | {o['ppl_change_pct']:+.3f}% |")
        lines.append("")
    md = "\n".join(lines)
    print(md)
    if a.out_dir:
        E.write_reports(result, md, a.out_dir, a.out_name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
