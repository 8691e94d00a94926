"""`eccokv eval ppl`: perplexity with the scored tokens reading a compressed cache.

Protocol, per window of `context + score` tokens (the same windows, seeded, for every
cache: a paired comparison):

1. prefill the first `context` tokens through the cache: one forward with
   `past_key_values=cache`; prefill attention is exact, then the cache compresses
   everything older than its exact window (EccoCache: `residual` tokens, in whole groups;
   QuantizedCache: the whole prompt at once);
2. score the next `score` tokens in one more forward through that cache, so every scored
   token attends to a context that lives in the compressed cache; the first scored token
   is predicted by the last prefill logit.

ppl = exp(mean NLL over all scored tokens of all windows). Since step 1 is exact for every
cache, its K/V and last logit do not depend on the cache: by default (`prefill="shared"`)
the window is prefilled once through a DynamicCache and its K/V are fed to each cache with
the same per-layer `update` calls the model would make (`common.replay`); `prefill=
"forward"` runs the prefill forward through every cache instead (the tests check that
both give identical NLLs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eccokv.eval import common as E

# int3 and hf-quanto-int4-kivi (QuantizedCache with per-channel keys) are available too; they
# are left out of the default run to keep it within ~30 min on two busy cores
DEFAULT_CODECS = ("none", "ecco4", "ecco3", "ecco2", "kivi4", "kivi3", "kivi2", "int4",
                  "int2", "fp8", "hf-quanto-int4", "hf-quanto-int2")
DEFAULT_RESIDUALS = (128, 0)
# 4 exact attention-sink tokens + 1024: with a residual of 0 or 128 every codec (groups of
# 128 or 32 tokens, or single tokens) then compresses exactly the same tokens; at 1024 the
# 128-token-group codecs would keep up to 124 more tokens exact than the others
DEFAULT_CONTEXT = 1028
DEFAULT_WINDOWS = 8  # >= 8 (shared/notes/measuring-quality.md); 16 takes > 1 h on 2 busy cores
REFERENCE = "none"
RATE_TOL = 0.01  # rates within 1% count as equal in the rate-distortion comparison


@torch.no_grad()
def score_window(model: Any, ids: torch.Tensor, context: int, cache: Any,
                 prefill: tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None
                 = None, values_per_token: int | None = None
                 ) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """Per-token NLL [score] of ids[0, context:] given a prefill of ids[0, :context] in `cache`.

    `prefill`: (K/V, last logits) from `common.exact_prefill` to replay instead of running
    the prefill forward through `cache`. Returns the NLLs (float64) and, if
    `values_per_token` is given, the bits of the cache the scored tokens read (after the
    prefill, before the scoring forward).
    """
    ids = ids.reshape(1, -1)
    if prefill is None:
        last = model(ids[:, :context], past_key_values=cache, use_cache=True,
                     logits_to_keep=1).logits[0, -1].float()
    else:
        kv, last = prefill
        E.replay(cache, kv)
    bits = None if values_per_token is None else E.cache_bits(cache, values_per_token).as_dict()
    out = model(ids[:, context:], past_key_values=cache, use_cache=True).logits[0].float()
    logits = torch.cat([last[None], out[:-1]], dim=0)
    nll = torch.nn.functional.cross_entropy(logits, ids[0, context:], reduction="none")
    return nll.double(), bits


def evaluate(model: Any, windows: torch.Tensor, codecs: Sequence[str], context: int,
             residuals: Sequence[int] = DEFAULT_RESIDUALS, prefill: str = "shared",
             show_progress: bool = True) -> dict[str, Any]:
    """Score every window with every (residual, cache) pair.

    Returns {"settings": [{"residual", "rows": {name: {"window_nll", "bits", "error"}}}]}
    where window_nll is the mean NLL of each window's scored tokens. QuantizedCache rows
    are measured once per window and shared by all residual settings (it quantises the
    whole prompt at once, so EccoCache's residual does not apply to it).
    """
    if prefill not in ("shared", "forward"):
        raise ValueError(f"prefill must be 'shared' or 'forward', got {prefill!r}")
    if windows.dim() != 2 or windows.shape[1] <= context:
        raise ValueError(f"windows must be [n, context + score] with score >= 1, got "
                         f"{tuple(windows.shape)} for context {context}")
    names = list(dict.fromkeys([REFERENCE, *codecs]))
    vpt = E.values_per_token(model)
    res: dict[int, dict[str, dict[str, Any]]] = {
        r: {n: {"window_nll": [], "bits": None, "error": None, "seconds": 0.0} for n in names}
        for r in residuals}
    hf_done: dict[str, dict[str, Any]] = {}
    jobs = [(w, r, n) for w in range(windows.shape[0]) for r in residuals for n in names
            if not (E.is_hf(n) and r != residuals[0])]
    pre: tuple[Any, torch.Tensor] | None = None
    current = -1
    for w, r, n in E.progress(jobs, total=len(jobs), desc="eval ppl", enabled=show_progress):
        ids = windows[w:w + 1]
        if prefill == "shared" and w != current:
            pre = E.exact_prefill(model, ids[:, :context])
            current = w
        row = hf_done.get(n) if E.is_hf(n) else None
        if row is None:
            row = res[r][n]
            if E.is_hf(n):
                hf_done[n] = row
        if row["error"] is not None:
            continue
        t0 = time.perf_counter()
        try:
            cache = E.make_cache(n, model.config, r)
        except Exception as e:  # a backend that does not install or run: say why
            row["error"] = f"{type(e).__name__}: {e}"
            continue
        try:
            nll, bits = score_window(model, ids, context, cache,
                                     pre if prefill == "shared" else None,
                                     values_per_token=vpt if row["bits"] is None else None)
        except Exception as e:
            if not E.is_hf(n):  # our own caches fail loudly
                raise
            row["error"] = f"{type(e).__name__}: {e}"  # the baseline's backend: say why
            row["window_nll"] = []
            continue
        row["window_nll"].append(float(nll.mean()))
        row["tokens_scored"] = row.get("tokens_scored", 0) + int(nll.numel())
        if row["bits"] is None:
            row["bits"] = bits
        row["seconds"] += time.perf_counter() - t0
    for r in residuals:
        for n, row in hf_done.items():
            res[r][n] = row
    return {"settings": [{"residual": r, "rows": res[r]} for r in residuals], "names": names}


def summarise(raw: dict[str, Any], n_boot: int = 2000, seed: int = 0,
              residual_of_hf: int = E.HF_DEFAULTS["residual_length"]) -> list[dict[str, Any]]:
    """Per residual setting, one row per cache: ppl, change vs `none` with its spread, bits."""
    out = []
    for s in raw["settings"]:
        rows = s["rows"]
        ref = rows[REFERENCE]["window_nll"]
        table = []
        for n in raw["names"]:
            row = rows[n]
            try:
                config = E.describe_cache(n, residual_of_hf if E.is_hf(n) else s["residual"])
            except (ValueError, KeyError) as e:
                config = {"error": str(e)}
            entry: dict[str, Any] = {"name": n, "family": E.family(n), "config": config,
                                     "error": row["error"]}
            if row["error"] is None and row["window_nll"]:
                nll = row["window_nll"]
                entry.update(ppl=math.exp(float(np.mean(nll))), mean_nll=float(np.mean(nll)),
                             window_nll=nll, tokens_scored=row.get("tokens_scored"),
                             seconds=row["seconds"], bits=row["bits"])
                entry.update(E.paired_rel_change(nll, ref, n_boot=n_boot, seed=seed))
                if E.is_hf(n):
                    entry["note"] = ("quantises the whole prompt at once (residual_length "
                                     "only applies to later tokens): same measurement in "
                                     "every residual setting")
            table.append(entry)
        out.append({"residual": s["residual"], "rows": table})
    return out


def check_targets(settings: list[dict[str, Any]], default_residual: int = 128,
                  context: int | None = None) -> list[dict[str, Any]]:
    """The targets, judged from the measured rows (met: True/False, None = not measurable)."""
    targets: list[dict[str, Any]] = []
    by_res = {s["residual"]: {r["name"]: r for r in s["rows"] if r.get("ppl")} for s in settings}

    def chg(rows: dict[str, Any], n: str) -> float | None:
        return rows[n]["rel_change_pct"] if n in rows else None

    main = by_res.get(default_residual)
    if main is not None:
        e4 = main.get("ecco4")
        c = chg(main, "ecco4")
        targets.append({
            "target": f"ecco4 ppl change <= +0.3% (context {context or '?'}, residual "
                      f"{default_residual})",
            "met": None if c is None else c <= 0.3,
            "detail": "ecco4 not measured" if e4 is None else
            f"ecco4 {c:+.3f}% (bootstrap {e4['ci_low_pct']:+.3f}..{e4['ci_high_pct']:+.3f}%)"})
    for res, rows in by_res.items():
        c = chg(rows, "ecco4")
        if c is None:
            continue
        for other in ("kivi3", "int4"):
            o = chg(rows, other)
            if o is not None:
                targets.append({"target": f"ecco4 lower than {other} (residual {res})",
                                "met": c < o, "detail": f"ecco4 {c:+.3f}% vs {other} {o:+.3f}%"
                                + paired_difference(rows["ecco4"], rows[other])})
        k4 = chg(rows, "kivi4")
        if k4 is not None:
            targets.append({
                "target": f"ecco4 vs kivi4, how close (residual {res})", "met": None,
                "detail": f"ecco4 {c:+.3f}% at {_bits(rows['ecco4']):.3f} bits vs kivi4 "
                          f"{k4:+.3f}% at {_bits(rows['kivi4']):.3f} bits: difference "
                          f"{c - k4:+.3f} points"
                          + paired_difference(rows["ecco4"], rows["kivi4"])})
        fails, checked = rate_distortion_failures(rows)
        targets.append({
            "target": f"every rate 2-4 bits: ecco's change below kivi's and int's at equal "
                      f"or higher bits/value (residual {res})",
            "met": (not fails) if checked else None,
            "detail": ("; ".join(checked) if not fails else
                       "not met for: " + "; ".join(fails) + ". Met for: "
                       + ("; ".join(c for c in checked if c not in fails) or "none"))})
    return targets


def paired_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """"ppl of a vs b" with a paired bootstrap over windows, and whether that difference is
    larger than its spread (a claimed win inside the spread is not a win)."""
    if not a.get("window_nll") or not b.get("window_nll"):
        return ""
    d = E.paired_rel_change(a["window_nll"], b["window_nll"])
    sig = d["ci_low_pct"] > 0 or d["ci_high_pct"] < 0
    return (f" [{a['name']} vs {b['name']}: {d['rel_change_pct']:+.3f}%, 5-95% "
            f"{d['ci_low_pct']:+.3f}..{d['ci_high_pct']:+.3f}: "
            f"{'outside' if sig else 'within'} the spread]")


def _bits(row: dict[str, Any]) -> float:
    return float((row.get("bits") or {}).get("compressed_bits_per_value") or float("nan"))


def rate_distortion_failures(rows: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Compare each kivi/int point with the ecco point of the highest rate not above its own
    (rates within RATE_TOL count as equal), for ecco rates 2-4. Returns (failures, all pairs)."""
    ecco = sorted(((_bits(r), n, r["rel_change_pct"]) for n, r in rows.items()
                   if E.family(n) == "ecco" and 2 - RATE_TOL <= _bits(r) <= 4 * (1 + RATE_TOL)))
    fails, checked = [], []
    if not ecco:
        return fails, checked
    for n, r in rows.items():
        if E.family(n) not in ("kivi", "int g128"):
            continue
        b = _bits(r)
        cands = [e for e in ecco if e[0] <= b * (1 + RATE_TOL)]
        if not cands:
            continue
        eb, en, ec = cands[-1]
        s = (f"{en} {ec:+.3f}% @{eb:.2f}b vs {n} {r['rel_change_pct']:+.3f}% @{b:.2f}b"
             + paired_difference(rows[en], r))
        checked.append(s)
        if not ec < r["rel_change_pct"]:
            fails.append(s)
    return fails, checked


def run(model_name: str = "smollm2", corpus: str = "wiki",
        codecs: Sequence[str] = DEFAULT_CODECS, context: int = DEFAULT_CONTEXT, score: int = 256,
        windows: int = DEFAULT_WINDOWS, residuals: Sequence[int] = DEFAULT_RESIDUALS, seed: int = 0,
        prefill: str = "shared", n_boot: int = 2000, out_dir: str | Path | None = "benchmarks",
        show_progress: bool = True, command: str | None = None,
        model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Load the model and data, evaluate, and write quality.{json,md,png} into out_dir."""
    from eccokv import data, models

    t0 = time.perf_counter()
    env = E.environment()
    if model is None:
        model, tokenizer = models.load(model_name)
    wins = data.token_windows(tokenizer, corpus, window=context + score, n=windows, seed=seed)
    raw = evaluate(model, wins, codecs, context, residuals, prefill, show_progress)
    settings = summarise(raw, n_boot=n_boot, seed=seed)
    default_res = 128 if 128 in residuals else residuals[0]
    result: dict[str, Any] = {
        "evaluation": "ppl",
        "command": command or "eccokv eval ppl",
        "model": E.model_block(model),
        "data": {"corpus": corpus, "windows": windows, "context": context, "score": score,
                 "seed": seed, "windows_sha256_16": E.tensor_digest(wins),
                 "description": f"{windows} windows of {context}+{score} tokens from corpus "
                                f"{corpus!r} (eccokv.data.token_windows, seed {seed})"},
        "protocol": {"prefill": prefill, "residuals": list(residuals), "reference": REFERENCE,
                     "bootstrap": {"n": n_boot, "seed": seed, "percentiles": [5, 95]},
                     "text": PROTOCOL},
        "environment": env,
        "settings": settings,
    }
    result["targets"] = check_targets(settings, default_res, context)
    result["seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        out = Path(out_dir)
        E.write_reports(result, to_markdown(result), out, "quality")
        try:
            plot(result, out / "quality.png")
            result["plot"] = str(out / "quality.png")
        except ImportError as e:  # matplotlib is in the eval extra
            result["plot"] = f"not drawn: {e}"
    return result


PROTOCOL = (
    "For each window of context+score tokens (the same seeded windows for every cache), the "
    "first `context` tokens are prefilled through the cache (exact prefill attention; the "
    "cache then compresses everything older than its exact window), and the next `score` "
    "tokens are scored in one more forward through that cache, so each scored token "
    "attends to the compressed context plus the exact window plus the scored tokens before "
    "it (exact). The first scored token is predicted by the last prefill logit. "
    "ppl = exp(mean NLL over all scored tokens of all windows); the change is relative to "
    "the `none` codec (identical to DynamicCache). Spread: paired bootstrap over windows "
    "(2000 resamples, 5-95 percentiles) of the relative change, and per-window min/max. "
    "Because prefill attention is exact, each window is prefilled once through a "
    "DynamicCache and its K/V are loaded into each cache with the same per-layer update() "
    "calls a prefill forward makes (identical state; checked by the tests). "
    "Bits/value: every byte of the compressed part (codes, scales, block and chunk "
    "metadata; quanto: packed codes + scales + shifts) over the compressed values, and the "
    "whole cache including the exact sink and window as stored (EccoCache: 16 bits by "
    "default, a @fp32/@bf16/@fp16 suffix sets it; `none` keeps float32), measured on the "
    "cache the scored tokens read. Scoring steps of more than 32 tokens use the decoded "
    "path (EccoCache does so for such steps).")


def to_markdown(result: dict[str, Any]) -> str:
    """quality.md: protocol, one table per residual setting, targets."""
    d = result["data"]
    lines = ["# KV-cache quality: perplexity (`eccokv eval ppl`)", "",
             *E.provenance_lines(result), "", "## Protocol", "", result["protocol"]["text"],
             "", "transformers' `QuantizedCache` rows (quanto backend) go through its own "
             "code path with q_group_size 64, residual_length 128, axis_key/axis_value 0 as "
             "documented (per token: groups of 64 consecutive values along head_dim, which "
             "is SmolLM2's head_dim); `-kivi` rows use axis_key -1 (groups of 64 tokens per "
             "channel). Unlike EccoCache, QuantizedCache quantises the whole prompt at once "
             "regardless of residual_length, so its rows are the same measurement in both "
             "tables. Its scales and shifts are stored in the model dtype (float32 here: "
             "+1 bit/value over an fp16 model).", ""]
    for s in result["settings"]:
        lines += [f"## Residual window {s['residual']} tokens (context {d['context']}, "
                  f"score {d['score']}, {d['windows']} windows)", ""]
        rows = []
        for r in s["rows"]:
            if r.get("error"):
                rows.append([r["name"], r["family"], "error", r["error"], "", "", "", "", ""])
                continue
            b = r.get("bits") or {}
            rows.append([r["name"], r["family"], f"{r['ppl']:.4f}",
                         f"{r['rel_change_pct']:+.3f}",
                         f"{r['ci_low_pct']:+.3f} .. {r['ci_high_pct']:+.3f}",
                         f"{r['window_min_pct']:+.2f} / {r['window_max_pct']:+.2f}",
                         E.fmt(b.get("compressed_bits_per_value"), ".3f"),
                         E.fmt(b.get("cache_bits_per_value"), ".3f"),
                         E.fmt(None if b.get("compressed_fraction") is None else
                               100 * b["compressed_fraction"], ".1f")])
        lines += E.md_table(["cache", "family", "ppl", "change %", "bootstrap 5-95% (change %)",
                             "per-window min / max %", "bits/value compressed",
                             "bits/value whole cache", "% of context compressed"], rows)
        lines.append("")
    lines += ["## Targets (judged from the measurement above)", ""]
    lines += E.md_table(["target", "met", "detail"],
                        [[t["target"], {True: "met", False: "NOT met", None: "-"}[t["met"]],
                          t["detail"]] for t in result["targets"]])
    lines += ["", "Met / NOT met compare point estimates; the bracket after each pair is the "
              "paired bootstrap of the two caches' perplexity ratio over the same windows: a "
              "difference 'within the spread' is not a measurable win or loss.", "",
              "Rate-distortion plot: `quality.png` (x: bits/value of the compressed part, "
              "y: change %, symlog; error bars: bootstrap 5-95%).", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Rate-distortion plot, one panel per residual setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = result["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.8), squeeze=False)
    styles = {"ecco": ("o-", "C0"), "kivi": ("s-", "C1"), "int g128": ("^-", "C2"),
              "fp8": ("D", "C3"), "hf QuantizedCache (quanto)": ("x", "C4")}
    for ax, s in zip(axes[0], settings, strict=True):
        fams: dict[str, list[dict[str, Any]]] = {}
        for r in s["rows"]:
            if r.get("ppl") is None or r["name"] == REFERENCE:
                continue
            fams.setdefault(r["family"], []).append(r)
        for fam, rows in fams.items():
            rows.sort(key=_bits)
            style, color = styles.get(fam, ("*", "k"))
            x = [_bits(r) for r in rows]
            y = [r["rel_change_pct"] for r in rows]
            err = [[max(0.0, r["rel_change_pct"] - r["ci_low_pct"]) for r in rows],
                   [max(0.0, r["ci_high_pct"] - r["rel_change_pct"]) for r in rows]]
            if fam == "hf QuantizedCache (quanto)":
                for xi, yi, r in zip(x, y, rows, strict=True):
                    ax.errorbar([xi], [yi], yerr=[[err[0][rows.index(r)]], [err[1][rows.index(r)]]],
                                fmt="x", color=color, capsize=3)
                    ax.annotate(r["name"].replace("hf-quanto-", "quanto "), (xi, yi),
                                fontsize=7, xytext=(4, 4), textcoords="offset points")
                ax.plot([], [], "x", color=color, label=fam)
                continue
            ax.errorbar(x, y, yerr=err, fmt=style, color=color, capsize=3, label=fam)
            for xi, yi, r in zip(x, y, rows, strict=True):
                ax.annotate(r["name"], (xi, yi), fontsize=7, xytext=(4, -10),
                            textcoords="offset points")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.axhline(0, color="gray", lw=0.5)
        ax.axhline(0.3, color="gray", lw=0.5, ls=":")
        ax.set_xlabel("bits/value of the compressed part (every byte counted)")
        ax.set_ylabel("perplexity change vs uncompressed (%)")
        ax.set_title(f"{result['model']['name']}, context {result['data']['context']}, "
                     f"residual {s['residual']}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
