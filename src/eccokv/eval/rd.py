"""`eccokv eval ppl --sweep`: rate-distortion curves, perplexity change against bits/value.

The ppl protocol of `eccokv.eval.ppl` (`evaluate`, `summarise`: the same seeded windows
for every cache, paired bootstrap 5-95% of the change vs `none`) run over a rate sweep of
codec families, one curve per family from 2 to 5 bits/value:

- x: bits/value of the compressed part, every byte counted (`compressed_bits_per_value`:
  all compressed K and V bytes over all compressed K and V values; K and V compress the
  same tokens, so this is the mean of K's and V's bits/value);
- y: perplexity change vs the uncompressed `none` cache, %, with its bootstrap interval.

Each point of the variable-rate family (`eb`) is checked against every other family's
curve, linearly interpolated in bits at the point's rate (only where that curve's
measured rates reach; within `ppl.RATE_TOL` of its ends): met when no curve lies below it.
The other families' points are checked against the interpolated eb curve the same way,
so "on or below every other family's curve at every rate from 2 to 5 bits" is judged at
every breakpoint of both piecewise-linear curves (the only places where the difference of
two such curves can peak). Verdicts compare point estimates; each comparison also carries
the paired bootstrap interval of the difference (same windows, same resamples).

Writes rd.{json,md,png}; the committed benchmarks/rd.* come from `eccokv eval ppl --sweep
--windows 32` (residuals 128 and 0, every family; the default --windows stays 8).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eccokv import provenance
from eccokv.eval import common as E
from eccokv.eval import ppl

# short key -> (family label, cache names in `common.make_cache`'s syntax)
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ecco": ("ecco (fixed rate)", ("ecco2", "ecco3", "ecco4")),
    "eb": ("ecco-eb (variable rate)", ("eb2", "eb2.5", "eb3", "eb3.5", "eb4", "eb5")),
    "kivi": ("KIVI (int g32)", ("kivi2", "kivi3", "kivi4")),
    "int": ("int g128", ("int2", "int3", "int4")),
    "hf": ("transformers QuantizedCache", ("hf-quanto-int2", "hf-quanto-int4")),
}
VARIABLE = "eb"  # the family whose curve the target is about
RATE_RANGE = (2.0, 5.0)  # bits/value
STEM = "rd"
TARGET = ("the variable-rate curve lies on or below every other family's at every rate "
          "from 2 to 5 bits")


def select(families: str | Sequence[str] | None = None) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The families named by short key ("ecco,kivi" or a list; None or "" = all), in
    FAMILIES order. Unknown keys raise ValueError naming the known ones."""
    if families is None:
        return dict(FAMILIES)
    keys = [k.strip() for k in (families.split(",") if isinstance(families, str) else families)]
    keys = [k for k in keys if k]
    if not keys:
        return dict(FAMILIES)
    bad = [k for k in keys if k not in FAMILIES]
    if bad:
        raise ValueError(f"unknown families {bad}: expected a comma-separated subset of "
                         + ", ".join(FAMILIES))
    return {k: v for k, v in FAMILIES.items() if k in keys}


def cache_names(families: dict[str, tuple[str, tuple[str, ...]]]) -> list[str]:
    """Every cache of the selected families, in order (`evaluate` adds the reference)."""
    return list(dict.fromkeys(n for _, names in families.values() for n in names))


# ------------------------------------------------------------------ curves and checks


def _point(row: dict[str, Any], name: str) -> dict[str, Any]:
    """One cache as a curve point (from a `summarise` row, or any dict with
    `bits.compressed_bits_per_value`, `rel_change_pct` and optionally the interval)."""
    b = ppl._bits(row)
    ok = row.get("error") is None and row.get("rel_change_pct") is not None and math.isfinite(b)
    return {"name": name, "bits_per_value": b if math.isfinite(b) else None,
            "rel_change_pct": row.get("rel_change_pct"), "ci_low_pct": row.get("ci_low_pct"),
            "ci_high_pct": row.get("ci_high_pct"), "measured": ok,
            "error": row.get("error") or (None if ok else "not measured")}


def curve(rows: dict[str, dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """The measured points of `names` among `rows` (by name), sorted by bits/value."""
    pts = [_point(rows[n], n) for n in names if n in rows]
    return sorted((p for p in pts if p["measured"]),
                  key=lambda p: (p["bits_per_value"], p["rel_change_pct"]))


def interpolate(points: Sequence[dict[str, Any]], bits: float,
                tol: float = ppl.RATE_TOL) -> dict[str, Any] | None:
    """The curve through `points` (sorted by bits) at `bits`, linear in bits between the
    two neighbouring points; None where the curve's measured rates do not reach (more than
    `tol` relative beyond its first or last point: no extrapolation). Returns
    {"rel_change_pct", "lo", "hi", "weight"} with value = (1-weight) lo + weight hi."""
    if not points:
        return None
    x0, x1 = points[0]["bits_per_value"], points[-1]["bits_per_value"]
    if bits < x0 * (1 - tol) or bits > x1 * (1 + tol):
        return None
    x = min(max(bits, x0), x1)
    for lo, hi in zip(points, points[1:], strict=False):
        if lo["bits_per_value"] <= x <= hi["bits_per_value"]:
            span = hi["bits_per_value"] - lo["bits_per_value"]
            w = (x - lo["bits_per_value"]) / span if span > 0 else 0.0
            return {"rel_change_pct": (1 - w) * lo["rel_change_pct"] + w * hi["rel_change_pct"],
                    "lo": lo["name"], "hi": hi["name"], "weight": w}
    p = points[0]  # a single point (x == x0 == x1)
    return {"rel_change_pct": p["rel_change_pct"], "lo": p["name"], "hi": p["name"],
            "weight": 0.0}


def _paired_interval(terms: Sequence[tuple[dict[str, Any], float]], ref: Sequence[float] | None,
                     n_boot: int, seed: int) -> list[float] | None:
    """5-95% paired bootstrap of sum(weight x change%) over the rows' windows (the same
    resampled windows for every row, as `common.paired_rel_change` does); None without the
    per-window NLLs."""
    if ref is None or any(not r.get("window_nll") for r, _ in terms):
        return None
    r = np.asarray(ref, dtype=np.float64)
    if any(len(row["window_nll"]) != r.size for row, _ in terms):
        return None
    idx = np.random.default_rng(seed).integers(0, r.size, size=(n_boot, r.size))
    total = np.zeros(n_boot)
    for row, w in terms:
        if w:
            d = np.asarray(row["window_nll"], dtype=np.float64) - r
            total += w * np.expm1(d[idx].mean(axis=1)) * 100
    return [float(np.percentile(total, 5)), float(np.percentile(total, 95))]


def compare(point: dict[str, Any], points: Sequence[dict[str, Any]],
            rows: dict[str, dict[str, Any]] | None = None, ref: Sequence[float] | None = None,
            n_boot: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """`point` against the curve through `points` at the point's rate: None where the curve
    does not reach that rate. difference_pct = point's change - the curve's (points);
    `curve_below` = the curve lies below the point. With `rows` (by name, with
    window_nll) and the reference's window NLLs, the difference's paired bootstrap 5-95%."""
    at = interpolate(points, point["bits_per_value"])
    if at is None:
        return None
    diff = point["rel_change_pct"] - at["rel_change_pct"]
    out = {"bits_per_value": point["bits_per_value"], "curve_change_pct": at["rel_change_pct"],
           "between": sorted({at["lo"], at["hi"]}), "weight": at["weight"],
           "difference_pct": diff, "curve_below": at["rel_change_pct"] < point["rel_change_pct"],
           "difference_ci_pct": None, "outside_spread": None}
    if rows is not None:
        terms = [(rows[point["name"]], 1.0), (rows[at["lo"]], -(1 - at["weight"])),
                 (rows[at["hi"]], -at["weight"])]
        ci = _paired_interval(terms, ref, n_boot, seed)
        if ci is not None:
            out["difference_ci_pct"] = ci
            out["outside_spread"] = ci[0] > 0 or ci[1] < 0
    return out


def _in_range(bits: float) -> bool:
    return RATE_RANGE[0] * (1 - ppl.RATE_TOL) <= bits <= RATE_RANGE[1] * (1 + ppl.RATE_TOL)


def check_setting(rows: dict[str, dict[str, Any]],
                  families: dict[str, tuple[str, tuple[str, ...]]],
                  variable: str = VARIABLE, n_boot: int = 2000, seed: int = 0,
                  residual: int | None = None) -> dict[str, Any]:
    """The target in one residual setting, from `summarise` rows (by name) or synthetic ones.

    Returns {"points": one check per variable-rate cache (met: True / False / None = not
    measured, outside 2-5 bits, or no other curve reaches its rate; below: the families
    whose curve lies below it), "others": the other families' points in 2-5 bits that the
    variable-rate curve reaches (below_variable: True if the point lies below it),
    "target": {"target", "met", "detail"}}. The target is not met if any check fails; met
    if none fails and every variable-rate cache was measured; else not judged (None)."""
    where = "" if residual is None else f" (residual {residual})"
    if variable not in families:
        return {"points": [], "others": [],
                "target": {"target": TARGET + where, "met": None,
                           "detail": f"the {variable!r} family was not part of the sweep"}}
    ref = (rows.get(ppl.REFERENCE) or {}).get("window_nll")
    vlabel, vnames = families[variable]
    vcurve = curve(rows, vnames)
    others = {k: (label, curve(rows, names)) for k, (label, names) in families.items()
              if k != variable}
    points = []
    for n in vnames:
        p = _point(rows[n], n) if n in rows else _point({"error": "not run"}, n)
        chk: dict[str, Any] = {**p, "met": None, "below": [], "compared": {},
                               "not_reaching": []}
        if not p["measured"]:
            chk["detail"] = f"not measured: {p['error']}"
            points.append(chk)
            continue
        for label, pts in others.values():
            c = compare(p, pts, rows, ref, n_boot, seed)
            if c is None:
                chk["not_reaching"].append(label)
                continue
            chk["compared"][label] = c
            if c["curve_below"]:
                chk["below"].append(label)
        if not _in_range(p["bits_per_value"]):  # compared, for information only
            chk["detail"] = (f"{p['bits_per_value']:.3f} bits/value: outside "
                             f"{RATE_RANGE[0]:g}-{RATE_RANGE[1]:g} bits, not judged")
        elif chk["compared"]:
            chk["met"] = not chk["below"]
            chk["detail"] = ("no other curve lies below it" if chk["met"] else
                             "below it: " + ", ".join(chk["below"]))
        else:
            chk["detail"] = "no other family's curve reaches this rate"
        points.append(chk)
    other_checks = []
    for label, pts in others.values():
        for p in pts:
            if not _in_range(p["bits_per_value"]):
                continue
            c = compare(p, vcurve, rows, ref, n_boot, seed)
            if c is None:
                continue
            ci = c["difference_ci_pct"]  # of this point - the eb curve: turned into eb - it
            other_checks.append({"family": label, "name": p["name"],
                                 "bits_per_value": p["bits_per_value"],
                                 "rel_change_pct": p["rel_change_pct"],
                                 "variable_change_pct": c["curve_change_pct"],
                                 "between": c["between"], "difference_pct": -c["difference_pct"],
                                 "difference_ci_pct": None if ci is None else [-ci[1], -ci[0]],
                                 "outside_spread": c["outside_spread"],
                                 "below_variable": c["difference_pct"] < 0})
    fails = ([f"{c['name']} ({c['detail']})" for c in points if c["met"] is False]
             + [f"{c['name']} of {c['family']} lies below the {vlabel} curve "
                f"({c['rel_change_pct']:+.3f}% vs {c['variable_change_pct']:+.3f}% at "
                f"{c['bits_per_value']:.2f} bits)" for c in other_checks if c["below_variable"]])
    unjudged: dict[str, list[str]] = {}  # detail -> the points it applies to
    for c in points:
        if c["met"] is None:
            unjudged.setdefault(c["detail"], []).append(c["name"])
    why = "; ".join(f"{', '.join(ns)}: {d}" for d, ns in unjudged.items())
    # an unmeasured point leaves a gap in the curve: no verdict; a point outside 2-5 bits
    # or where no other curve reaches is not part of the comparison, and does not block one
    unmeasured = [c["name"] for c in points if not c["measured"]]
    judged = sum(c["met"] is True for c in points) + len(other_checks)
    if fails:
        met: bool | None = False
        detail = "not met: " + "; ".join(fails) + (f". Not judged: {why}" if why else "")
    elif points and not unmeasured and judged:
        met = True
        detail = (f"met at the {sum(c['met'] is True for c in points)} {vlabel} points "
                  f"compared and at the {len(other_checks)} points of other families its "
                  "curve reaches" + (f". Not judged: {why}" if why else ""))
    else:
        met = None
        detail = f"not judged: {why}" if why else f"no {vlabel} point could be compared"
    return {"points": points, "others": other_checks,
            "target": {"target": TARGET + where, "met": met, "detail": detail}}


def curves(rows: dict[str, dict[str, Any]], families: dict[str, tuple[str, tuple[str, ...]]]
           ) -> list[dict[str, Any]]:
    """Per family: its label and every cache as a point (measured or with its error),
    measured ones sorted by bits/value first."""
    out = []
    for k, (label, names) in families.items():
        pts = [_point(rows[n], n) for n in names if n in rows]
        pts.sort(key=lambda p: (not p["measured"], p["bits_per_value"] or 0.0))
        out.append({"key": k, "label": label, "points": pts})
    return out


# ------------------------------------------------------------------ the sweep


def sweep(model: Any, windows: torch.Tensor, families: str | Sequence[str] | None = None,
          context: int = ppl.DEFAULT_CONTEXT, residuals: Sequence[int] = ppl.DEFAULT_RESIDUALS,
          prefill: str = "shared", n_boot: int = 2000, seed: int = 0,
          show_progress: bool = True) -> dict[str, Any]:
    """`ppl.evaluate` + `ppl.summarise` over the families' caches on `windows`, then the
    curves and the checks per residual setting."""
    fams = select(families)
    raw = ppl.evaluate(model, windows, cache_names(fams), context, residuals, prefill,
                       show_progress)
    settings = ppl.summarise(raw, n_boot=n_boot, seed=seed)
    out = []
    for s in settings:
        rows = {r["name"]: r for r in s["rows"]}
        out.append({"residual": s["residual"], "curves": curves(rows, fams),
                    "check": check_setting(rows, fams, n_boot=n_boot, seed=seed,
                                           residual=s["residual"])})
    return {"families": {k: {"label": label, "caches": list(names)}
                         for k, (label, names) in fams.items()},
            "settings": settings, "sweep": out}


def run(model_name: str = "smollm2", corpus: str = "wiki",
        families: str | Sequence[str] | None = None, context: int = ppl.DEFAULT_CONTEXT,
        score: int = 256, windows: int = ppl.DEFAULT_WINDOWS,
        residuals: Sequence[int] = ppl.DEFAULT_RESIDUALS, seed: int = 0,
        prefill: str = "shared", n_boot: int = 2000, out_dir: str | Path | None = "benchmarks",
        show_progress: bool = True, command: str | None = None, model: Any = None,
        tokenizer: Any = None, token_windows: torch.Tensor | None = None) -> dict[str, Any]:
    """Load the model and the ppl protocol's windows (or take `token_windows` [n, context +
    score]), sweep, and write rd.{json,md,png} into out_dir."""
    from eccokv import data, models

    t0 = time.perf_counter()
    fams = select(families)  # bad keys fail before the model loads
    env = E.environment()
    if model is None:
        model, tokenizer = models.load(model_name)
    if token_windows is None:
        wins = data.token_windows(tokenizer, corpus, window=context + score, n=windows,
                                  seed=seed)
        what = (f"{windows} windows of {context}+{score} tokens from corpus {corpus!r} "
                f"(eccokv.data.token_windows, seed {seed})")
    else:
        wins = token_windows
        score = wins.shape[1] - context
        windows = wins.shape[0]
        what = f"{windows} given windows of {context}+{score} tokens"
    res = sweep(model, wins, list(fams), context, residuals, prefill, n_boot, seed,
                show_progress)
    result: dict[str, Any] = {
        "evaluation": "ppl-sweep",
        "command": command or "eccokv eval ppl --sweep",
        "model": E.model_block(model),
        "data": {"corpus": corpus if token_windows is None else None, "windows": windows,
                 "context": context, "score": score, "seed": seed,
                 "windows_sha256_16": E.tensor_digest(wins), "description": what},
        "protocol": {"prefill": prefill, "residuals": list(residuals),
                     "reference": ppl.REFERENCE,
                     "bootstrap": {"n": n_boot, "seed": seed, "percentiles": [5, 95]},
                     "rate_range_bits": list(RATE_RANGE), "rate_tolerance": ppl.RATE_TOL,
                     "text": ppl.PROTOCOL, "sweep": SWEEP_TEXT},
        "environment": env,
        **res,
    }
    result["targets"] = [s["check"]["target"] for s in res["sweep"]]
    result["seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        write(result, out_dir)
    return result


def write(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """rd.json, rd.md (`common.write_reports`: provenance and source digest included) and
    rd.png; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{STEM}.png"
    try:
        plot(result, png)  # drawn first: whether it was goes into the json
        result["plot"] = str(png)
    except ImportError as e:  # matplotlib is in the eval extra
        result["plot"] = f"not drawn: {e}"
    paths = E.write_reports(result, to_markdown(result), out, STEM)
    return paths + ([png] if png.exists() and result["plot"] == str(png) else [])


SWEEP_TEXT = (
    "Rate sweep: each family's caches are measured with the ppl protocol above on the same "
    "windows. x = bits/value of the compressed part, every byte counted (all compressed K "
    "and V bytes over all compressed K and V values; K and V compress the same tokens, so "
    "this is the mean of K's and V's); y = perplexity change vs `none`, % (paired bootstrap "
    "5-95%). Check: each variable-rate (eb) point against every other family's curve "
    "linearly interpolated in bits at its rate (no extrapolation beyond 1% of a curve's "
    "measured rates), and each other family's point in 2-5 bits against the interpolated "
    "eb curve. Met / not met compare point estimates; the bracket is the paired bootstrap "
    "5-95% of the difference (eb minus the other), a difference within it is not a "
    "measurable win or loss.")


# ------------------------------------------------------------------ reports


def _chg(p: dict[str, Any]) -> str:
    if not p.get("measured", True) or p.get("rel_change_pct") is None:
        return f"not measured: {p.get('error')}"
    s = f"{p['rel_change_pct']:+.3f}"
    if p.get("ci_low_pct") is not None:
        s += f" [{p['ci_low_pct']:+.3f}, {p['ci_high_pct']:+.3f}]"
    return s


def _ci(c: dict[str, Any]) -> str:
    ci = c.get("difference_ci_pct")
    if ci is None:
        return ""
    return (f" [{ci[0]:+.3f}, {ci[1]:+.3f}: "
            f"{'outside' if c['outside_spread'] else 'within'} the spread]")


_VERDICT = {True: "met", False: "NOT met", None: "-"}


def to_markdown(result: dict[str, Any]) -> str:
    """rd.md: provenance, protocol, one table and one check per residual setting."""
    d = result["data"]
    lines = ["# Rate-distortion sweep: perplexity change against bits/value "
             "(`eccokv eval ppl --sweep`)", "",
             provenance.header_line(result["environment"]), *E.provenance_lines(result), "",
             "## Protocol", "", result["protocol"]["text"], "", result["protocol"]["sweep"], "",
             "Families: " + "; ".join(f"{f['label']} (`{k}`): {', '.join(f['caches'])}"
                                      for k, f in result["families"].items()) + ".", "",
             "transformers' QuantizedCache quantises the whole prompt at once with its own "
             "residual_length of 128: its points are the same measurement in every residual "
             "setting. `eb*` caches are `EccoCache(model.config, target_bits=x, "
             "residual_length=r)`; where EccoCache does not take that argument their rows "
             "show the error it raised.", ""]
    for s in result["sweep"]:
        lines += [f"## Residual window {s['residual']} tokens (context {d['context']}, "
                  f"score {d['score']}, {d['windows']} windows)", ""]
        rows = [[c["label"], p["name"], E.fmt(p["bits_per_value"], ".3f"), _chg(p)]
                for c in s["curves"] for p in c["points"]]
        lines += E.md_table(["family", "cache", "bits/value", "Δppl % [5%, 95%]"], rows)
        chk = s["check"]
        lines += ["", f"### Variable-rate points against the other curves (residual "
                  f"{s['residual']})", ""]
        if chk["points"]:
            prow = []
            for c in chk["points"]:
                cmp = "; ".join(f"{lab}: {x['curve_change_pct']:+.3f}% ("
                                + "/".join(x["between"]) + f"), eb - it "
                                f"{x['difference_pct']:+.3f}{_ci(x)}"
                                for lab, x in c["compared"].items())
                if c["not_reaching"]:
                    cmp += ("; " if cmp else "") + "not reaching this rate: " + ", ".join(
                        c["not_reaching"])
                if not c["measured"]:  # its error is in the change column
                    prow.append([c["name"], "-", _chg(c), "-", "-", "-"])
                    continue
                prow.append([c["name"], E.fmt(c["bits_per_value"], ".3f"), _chg(c),
                             _VERDICT[c["met"]],
                             ", ".join(c["below"]) or ("none" if c["compared"] else "-"),
                             (cmp + ("" if c["met"] is not None else f" ({c['detail']})"))
                             if cmp else c["detail"]])
            lines += E.md_table(["eb cache", "bits/value", "Δppl % [5%, 95%]", "on or below "
                                 "every curve", "curves below it", "other curves at this "
                                 "rate (interpolated between)"], prow)
        if chk["others"]:
            lines += ["", "Other families' points against the interpolated eb curve:", ""]
            lines += E.md_table(
                ["family", "cache", "bits/value", "Δppl %", "eb curve there", "below the eb "
                 "curve", "eb - it"],
                [[c["family"], c["name"], f"{c['bits_per_value']:.3f}",
                  f"{c['rel_change_pct']:+.3f}", f"{c['variable_change_pct']:+.3f} ("
                  + "/".join(c["between"]) + ")", "yes" if c["below_variable"] else "no",
                  f"{c['difference_pct']:+.3f}{_ci(c)}"]
                 for c in chk["others"]])
        t = chk["target"]
        lines += ["", f"Target, {t['target']}: **{_VERDICT[t['met']]}**. {t['detail']}", ""]
    lines += ["## Targets (judged from the measurement above)", ""]
    lines += E.md_table(["target", "met", "detail"],
                        [[t["target"], _VERDICT[t["met"]], t["detail"]]
                         for t in result["targets"]])
    lines += ["", f"Plot: `{STEM}.png` (x: bits/value of the compressed part, y: Δppl %, "
              "symlog; error bars: bootstrap 5-95%).", ""]
    return "\n".join(lines)


_STYLES = {"ecco": ("o-", "C0"), "eb": ("*-", "C3"), "kivi": ("s-", "C1"),
           "int": ("^-", "C2"), "hf": ("x--", "C4")}


def plot(result: dict[str, Any], path: str | Path) -> None:
    """One panel per residual setting: one line per family, bootstrap error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw = result["sweep"]
    fig, axes = plt.subplots(1, len(sw), figsize=(6.5 * len(sw), 4.8), squeeze=False)
    for ax, s in zip(axes[0], sw, strict=True):
        for c in s["curves"]:
            style, color = _STYLES.get(c["key"], ("d-", "k"))
            pts = [p for p in c["points"] if p["measured"]]
            if not pts:
                err = next((p["error"] for p in c["points"] if p["error"]), "not measured")
                ax.plot([], [], style, color=color,
                        label=f"{c['label']}: not measured ({err.split(':')[0]})")
                continue
            x = [p["bits_per_value"] for p in pts]
            y = [p["rel_change_pct"] for p in pts]
            lo = [max(0.0, p["rel_change_pct"] - p["ci_low_pct"])
                  if p["ci_low_pct"] is not None else 0.0 for p in pts]
            hi = [max(0.0, p["ci_high_pct"] - p["rel_change_pct"])
                  if p["ci_high_pct"] is not None else 0.0 for p in pts]
            ax.errorbar(x, y, yerr=[lo, hi], fmt=style, color=color, capsize=3,
                        label=c["label"], markersize=7 if c["key"] == VARIABLE else 5)
            for p in pts:
                ax.annotate(p["name"].replace("hf-quanto-", "quanto "),
                            (p["bits_per_value"], p["rel_change_pct"]), fontsize=7,
                            xytext=(4, -10), textcoords="offset points", color=color)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.axhline(0, color="gray", lw=0.5)
        for b in RATE_RANGE:
            ax.axvline(b, color="gray", lw=0.5, ls=":")
        xs = [p["bits_per_value"] for c in s["curves"] for p in c["points"] if p["measured"]]
        ax.set_xlim(min([RATE_RANGE[0], *xs]) - 0.25, max([RATE_RANGE[1], *xs]) + 0.25)
        ax.set_xlabel("bits/value of the compressed part (every byte counted, mean of K and V)")
        ax.set_ylabel("Δppl vs uncompressed (%)")
        ax.set_title(f"{result['model']['name']}, context {result['data']['context']}, "
                     f"residual {s['residual']}, {result['data']['windows']} windows")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


# ------------------------------------------------------------------ command line


def add_cli(ppl_parser: Any) -> None:
    """`eccokv eval ppl --sweep [--families ecco,eb,kivi,int,hf]`."""
    ppl_parser.add_argument(
        "--sweep", action="store_true",
        help="rate-distortion sweep: Δppl against bits/value, one curve per family, "
             f"2-{RATE_RANGE[1]:g} bits (-> {STEM}.{{json,md,png}}); caches come from "
             "--families, not --codecs")
    ppl_parser.add_argument(
        "--families", default=None,
        help="with --sweep: comma-separated subset of " + ", ".join(
            f"{k} ({label})" for k, (label, _) in FAMILIES.items()) + " (default: all)")


def run_cli(args: Any) -> int:
    """Run `eccokv eval ppl --sweep` from parsed arguments; 0 on success, 2 on bad usage."""
    from eccokv import cli

    if not getattr(args, "sweep", False):
        print("eccokv eval ppl: --families needs --sweep", file=sys.stderr)
        return 2
    if getattr(args, "codecs", None) not in (None, ",".join(ppl.DEFAULT_CODECS)):
        print("eccokv eval ppl: --sweep measures the caches of --families; --codecs does not "
              "apply to it", file=sys.stderr)
        return 2
    try:
        fams = select(args.families)
        residuals = [int(r) for r in str(args.residual).split(",") if r.strip()]
    except ValueError as e:
        print(f"eccokv eval ppl: {e}", file=sys.stderr)
        return 2
    res = run(model_name=args.model, corpus=args.corpus, families=list(fams),
              context=args.context, score=args.score, windows=args.windows,
              residuals=residuals, seed=args.seed, prefill=args.prefill,
              out_dir=args.out_dir or None, show_progress=not args.no_progress,
              command=cli._command_line())
    if args.json:
        print(json.dumps(res, indent=1, default=float))
    else:
        print(to_markdown(res))
        if args.out_dir:
            print(f"wrote {args.out_dir}/{STEM}.json, {STEM}.md and {STEM}.png")
    return 0
