"""What the weights profile and activation-aware encoding buy (benchmarks/weights_profile.*).

    nice -n 15 .venv/bin/python benchmarks/weights_profile.py            # measure
    nice -n 15 .venv/bin/python benchmarks/weights_profile.py --ship     # + write the profile

Models: SmolLM2-135M (its dequantised Q4_1 float weights are the reference) and
all-MiniLM-L6-v2 (real float weights; a BERT encoder). Every Linear compress_model would
compress is encoded in the flat layout (`EccoLinear`), decoded, and compared with the
original: relative weight error, activation-weighted output error per layer
||(W - W^) x|| / ||W x|| on held-out activations (Wikipedia text), fallback blocks,
bits/weight (blocks + per-tensor scale; tables of non-shipped profiles, which would travel
with the data, not counted), and end to end: SmolLM2 perplexity on Wikipedia windows,
MiniLM mean-pooled sentence-embedding cosine vs the original on 200 Wikipedia sentences.
Activation-aware runs take E[x^2] from news text (disjoint from the evaluation text).

Candidate profiles (each = build_profile on a 60000-group mix, seed 0):
  syn          synthetic weight groups only
  smol+syn     SmolLM2 groups + 25% synthetic (MiniLM held out)
  minilm+syn   MiniLM groups + 25% synthetic (SmolLM2 held out)
  smol+minilm  both models, no synthetic
  mix          SmolLM2 + MiniLM (equal shares) + 25% synthetic   <- shipped
  smol-own, smol-own-aw   calibrate_weights("smollm2") without / with activation-weighted
               sampling (model-specific, SmolLM2 only)
"""

from __future__ import annotations  # noqa: I001  (eccokv before torch)

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import eccokv  # noqa: F401  (runtime settings before torch)
import torch

from eccokv import codecs, data, models
from eccokv.codecs.ecco import EccoCodec
from eccokv.codecs.ecco_profile import Profile
from eccokv.provenance import environment, header_line
from eccokv.weights.compress import activation_moments, linear_layers
from eccokv.weights.profile import (
    calibrate_weights,
    learn_weights_profile,
    synthetic_weight_groups,
    weight_groups,
)

OUT = Path(__file__).resolve().parent
SHIP = Path(__file__).resolve().parents[1] / "src" / "eccokv" / "profiles" / "weights.ecprof"
SHIP_COMMAND = "nice -n 15 .venv/bin/python benchmarks/weights_profile.py --ship"
EVAL_VARIANTS = ("ecco4", "ecco3")
ACT_ROWS = 256  # held-out activation rows per layer for the output error


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_minilm() -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    from eccokv.bench.profiles import minilm_folder

    f = minilm_folder()
    return (AutoModel.from_pretrained(f, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(f))


def sentences(n: int = 200) -> list[str]:
    out: list[str] = []
    for _, text in data.wiki_articles(min_chars=2000):
        for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")):
            if 40 <= len(s) <= 300 and "=" not in s and "|" not in s:
                out.append(s)
                if len(out) == n:
                    return out
    return out


@torch.no_grad()
def held_out_inputs(model: Any, batches: list[torch.Tensor], names: list[str],
                    rows: int = ACT_ROWS, seed: int = 0) -> dict[str, torch.Tensor]:
    """`rows` random input rows of each named Linear over the given token batches."""
    mods = dict(model.named_modules())
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hs = [mods[n].register_forward_pre_hook(
        lambda m, a, n=n: got[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).float()))
        for n in names]
    try:
        for b in batches:
            model(input_ids=b)
    finally:
        for h in hs:
            h.remove()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        x = torch.cat(got[n])
        out[n] = x[torch.randperm(len(x), generator=g)[:rows]].contiguous()
    return out


def weight_bits(c: Any) -> int:
    return sum(8 * a.nbytes for k, a in c.arrays.items() if not k.startswith("profile_"))


@torch.no_grad()
def compress_weights(model: Any, codec: Any, names: list[str],
                     moments: dict[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor],
                                                                       int]:
    mods = dict(model.named_modules())
    out, bits = {}, 0
    for n in names:
        w = mods[n].weight.detach()
        flat = w.reshape(-1)
        if moments is not None and codec.supports_importance:
            c = codec.encode(flat, axis=0, importance=moments[n].repeat(w.shape[0]))
        else:
            c = codec.encode(flat, axis=0)
        bits += weight_bits(c)
        out[n] = codec.decode(c).reshape(w.shape)
    return out, bits


def layer_errors(orig: dict[str, torch.Tensor], new: dict[str, torch.Tensor],
                 acts: dict[str, torch.Tensor]) -> dict[str, float]:
    num = den = 0.0
    outs = []
    for n, w in orig.items():
        d = w - new[n]
        num += float((d.double() ** 2).sum())
        den += float((w.double() ** 2).sum())
        x = acts[n]
        outs.append(float((x @ d.T).norm() / (x @ w.T).norm()))
    return {"rel_weight_err": math.sqrt(num / den), "out_err_mean": float(np.mean(outs)),
            "out_err_median": float(np.median(outs)), "out_err_max": float(np.max(outs))}


@torch.no_grad()
def set_weights(model: Any, ws: dict[str, torch.Tensor]) -> None:
    mods = dict(model.named_modules())
    for n, w in ws.items():
        mods[n].weight.copy_(w)


@torch.no_grad()
def ppl(model: Any, windows: torch.Tensor) -> float:
    nll, cnt = 0.0, 0
    for w in windows:
        logits = model(input_ids=w[None]).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        cnt += w.numel() - 1
    return math.exp(nll / cnt)


@torch.no_grad()
def embed(model: Any, tok: Any, sents: list[str]) -> torch.Tensor:
    outs = []
    for i in range(0, len(sents), 50):
        b = tok(sents[i:i + 50], padding=True, truncation=True, max_length=128,
                return_tensors="pt")
        h = model(**b).last_hidden_state
        m = b["attention_mask"][..., None].float()
        outs.append((h * m).sum(1) / m.sum(1))
    return torch.nn.functional.normalize(torch.cat(outs), dim=-1)


def build_candidates(smol: Any, mini: Any, smol_tok: Any, variants: tuple[str, ...],
                     cache: Path | None = None) -> dict[str, Any]:
    """The candidate profiles (module docstring); `cache`: a folder to keep them in."""
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    gs, gm = weight_groups(smol), weight_groups(mini)
    spec = {"syn": ([synthetic_weight_groups(60_000, seed=1)], 0.0),
            "smol+syn": ([gs], 0.25), "minilm+syn": ([gm], 0.25),
            "smol+minilm": ([gs, gm], 0.0), "mix": ([gs, gm], 0.25)}
    profs: dict[str, Any] = {"kv-default": "default"}
    for name, (srcs, syn) in spec.items():
        t0 = time.perf_counter()
        if cache is not None and (cache / f"{name}.ecprof").is_file():
            profs[name] = Profile.load(cache / f"{name}.ecprof")
            continue
        profs[name] = learn_weights_profile(srcs, variants=variants, synthetic=syn)
        if cache is not None:
            profs[name].save(cache / f"{name}.ecprof")
        say(f"profile {name}: {time.perf_counter() - t0:.0f} s, {profs[name].info['groups']} "
            "groups")
    for name, aw in (("smol-own", False), ("smol-own-aw", True)):
        t0 = time.perf_counter()
        if cache is not None and (cache / f"{name}.ecprof").is_file():
            profs[name] = Profile.load(cache / f"{name}.ecprof")
            continue
        profs[name], _ = calibrate_weights(smol, None, calibration=_smol_calib(smol_tok),
                                           activation_weighted=aw, variants=variants)
        if cache is not None:
            profs[name].save(cache / f"{name}.ecprof")
        say(f"profile {name}: {time.perf_counter() - t0:.0f} s")
    return profs


def _smol_calib(tok: Any) -> list[torch.Tensor]:
    return list(data.token_windows(tok, "news", window=512, n=4)[:, None])


def _minilm_calib(tok: Any) -> list[torch.Tensor]:
    ids = tok("\n\n".join(data.news_articles()[:80]), add_special_tokens=False,
              return_tensors="pt").input_ids[0]
    return [ids[i * 256:(i + 1) * 256][None] for i in range(4)]


def evaluate_model(key: str, model: Any, tok: Any, profs: dict[str, Any],
                   rows: list[dict[str, Any]]) -> None:
    names = linear_layers(model)
    mods = dict(model.named_modules())
    orig = {n: mods[n].weight.detach().clone() for n in names}
    if key == "smollm2":
        calib = _smol_calib(tok)
        evalw = data.token_windows(tok, "wiki", window=512, n=4)
        acts = held_out_inputs(model, list(evalw[:2, None]), names)
        ref_metric = ppl(model, evalw)
        metric_name = "ppl"
        profiles = ["kv-default", "mix", "minilm+syn", "smol+syn", "syn", "smol+minilm",
                    "smol-own", "smol-own-aw"]
    else:
        calib = _minilm_calib(tok)
        wiki = "\n\n".join(t for _, t in data.wiki_articles(min_chars=2000)[:30])
        ids = tok(wiki, add_special_tokens=False, return_tensors="pt").input_ids[0]
        acts = held_out_inputs(model, [ids[i * 256:(i + 1) * 256][None] for i in range(2)],
                               names)
        sents = sentences(200)
        ref_emb = embed(model, tok, sents)
        ref_metric = 1.0
        metric_name = "cosine"
        profiles = ["kv-default", "mix", "smol+syn", "minilm+syn", "syn", "smol+minilm"]
    moments = activation_moments(model, calib, names)
    nw = sum(w.numel() for w in orig.values())
    rows.append({"model": key, "codec": "reference", "profile": "-", "aware": False,
                 metric_name: ref_metric, "bits_per_weight": 32.0 if key != "smollm2"
                 else None})

    def one(codec_name: str, codec: Any, prof: str, aware: bool) -> None:
        t0 = time.perf_counter()
        if hasattr(codec, "reset_stats"):
            codec.reset_stats()
        new, bits = compress_weights(model, codec, names, moments if aware else None)
        r = {"model": key, "codec": codec_name, "profile": prof, "aware": aware,
             **layer_errors(orig, new, acts), "bits_per_weight": bits / nw}
        if "fallback_rate" in getattr(codec, "stats", dict)():
            r["fallback_rate"] = codec.stats()["fallback_rate"]
        set_weights(model, new)
        if key == "smollm2":
            r["ppl"] = ppl(model, evalw)
        else:
            r["cosine"] = float((embed(model, tok, sents) * ref_emb).sum(1).mean())
        set_weights(model, orig)
        r["seconds"] = time.perf_counter() - t0
        rows.append(r)
        say(f"{key} {codec_name} {prof} aware={aware}: " + ", ".join(
            f"{k}={v:.5g}" for k, v in r.items() if isinstance(v, float)))

    one("int4 g128", codecs.get("int4"), "-", False)
    for v in EVAL_VARIANTS:
        for p in profiles:
            codec = EccoCodec(v, profile=profs[p])
            awares = ((False, True) if p in ("kv-default", "mix", "smol+syn", "minilm+syn",
                                             "smol-own")
                      else (True,) if p == "smol-own-aw" else (False,))
            for aw in awares:
                one(v, codec, p, aw)


def to_markdown(res: dict[str, Any]) -> str:
    lines = ["# Weights profile and activation-aware encoding", "",
             f"Command: `{res['command']}`  ", header_line(res["environment"]),
             f"Shipped profile: `{res.get('shipped', {}).get('hash', '-')}` "
             f"({res.get('shipped', {}).get('command', '-')})", "", res["note"], ""]
    for key, metric in (("smollm2", "ppl"), ("all-MiniLM-L6-v2", "cosine")):
        rows = [r for r in res["rows"] if r["model"] == key]
        if not rows:
            continue
        ref = rows[0][metric]
        lines += [f"## {key}", "", f"reference {metric}: {ref:.4f}", "",
                  f"| codec | profile | act.-aware | rel. weight err | output err (mean / "
                  f"median / max over layers) | {metric} | fallback | bits/weight |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows[1:]:
            fb = f"{r['fallback_rate']:.4f}" if "fallback_rate" in r else "-"
            lines.append(
                f"| {r['codec']} | {r['profile']} | {'yes' if r['aware'] else 'no'} | "
                f"{r['rel_weight_err']:.4f} | {r['out_err_mean']:.4f} / "
                f"{r['out_err_median']:.4f} / {r['out_err_max']:.4f} | {r[metric]:.4f} | "
                f"{fb} | {r['bits_per_weight']:.3f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def ship(smol: Any, mini: Any) -> dict[str, Any]:
    prof = learn_weights_profile(
        [weight_groups(smol), weight_groups(mini)], synthetic=0.25,
        info={"command": SHIP_COMMAND, "sources": ["smollm2 (Q4_1 GGUF, dequantised)",
                                                   "all-MiniLM-L6-v2"],
              "eccokv": __import__("eccokv").__version__})
    prof.save(SHIP)
    return {"path": "src/eccokv/profiles/weights.ecprof", "hash": prof.hash,
            "command": SHIP_COMMAND,
            "tables": {v: t.hash for v, t in prof.variants.items()}}


_LOG_ROW = re.compile(r"^\[[0-9:]+\] (\S+) (int4 g128|ecco\d) (\S+) aware=(True|False): (.*)$")


def rows_from_log(log: str, model: str) -> list[dict[str, Any]]:
    """The rows of `model` a (stopped) run printed: `say` lines of `evaluate_model`."""
    rows = []
    for line in log.splitlines():
        m = _LOG_ROW.match(line.strip())
        if m and m.group(1) == model:
            r: dict[str, Any] = {"model": model, "codec": m.group(2), "profile": m.group(3),
                                 "aware": m.group(4) == "True"}
            for kv in m.group(5).split(", "):
                k, v = kv.split("=")
                r[k] = float(v)
            rows.append(r)
    return rows


def merge_log(log_path: str, model: str, ref: float, metric: str) -> None:
    """Add `model`'s rows from a run's log to weights_profile.json / .md (for a run stopped
    before it finished that model; its reference `metric` computed separately)."""
    res = json.loads((OUT / "weights_profile.json").read_text())
    rows = [r for r in res["rows"] if r["model"] != model]
    got = rows_from_log(Path(log_path).read_text(), model)
    rows += [{"model": model, "codec": "reference", "profile": "-", "aware": False,
              metric: ref, "bits_per_weight": None}] + got
    res["rows"] = rows
    res.setdefault("partial", {})[model] = (f"{len(got)} rows from the log of a run stopped "
                                            "for time (merge_log)")
    (OUT / "weights_profile.json").write_text(json.dumps(res, indent=1) + "\n")
    (OUT / "weights_profile.md").write_text(to_markdown(res))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ship", action="store_true", help="also write the shipped profile")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--cache", default=None, help="folder to keep the candidate profiles in")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    smol, smol_tok = models.load("smollm2")
    mini, mini_tok = load_minilm()
    res: dict[str, Any] = {"benchmark": "weights_profile",
                           "command": "nice -n 15 .venv/bin/python benchmarks/weights_profile.py"
                           + (" --ship" if a.ship else ""),
                           "note": __doc__.split("\n\n", 2)[2].strip()}
    if a.ship:
        res["shipped"] = ship(smol, mini)
        say(f"shipped {res['shipped']}")
    if not a.no_eval:
        profs = build_candidates(smol, mini, smol_tok, EVAL_VARIANTS,
                                 Path(a.cache) if a.cache else None)
        res["profiles"] = {k: (v if isinstance(v, str) else
                               {"hash": v.hash, "tables": {n: t.hash
                                                           for n, t in v.variants.items()}})
                           for k, v in profs.items()}
        rows: list[dict[str, Any]] = []
        res["rows"] = rows
        for key, (m, t) in (("all-MiniLM-L6-v2", (mini, mini_tok)),
                            ("smollm2", (smol, smol_tok))):
            evaluate_model(key, m, t, profs, rows)
            res["environment"] = environment()
            res["seconds"] = time.perf_counter() - t0
            (OUT / "weights_profile.json").write_text(json.dumps(res, indent=1) + "\n")
            (OUT / "weights_profile.md").write_text(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
