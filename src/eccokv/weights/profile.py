"""The Ecco profile for model weights: groups of the flat weight layout -> `build_profile`.

`weight_groups(model)` cuts every Linear `compress_model` would compress into the groups
Ecco codes (128 consecutive values of the row-major weight, see `EccoLinear`);
`learn_weights_profile` learns patterns and codebooks from the groups of one or more
models (balanced per model) mixed with `synthetic_weight_groups` (Gaussian, Laplace and
Student-t groups with a few outliers) so that the tables do not fit one model only; the
learning itself is `eccokv.codecs.ecco_calibrate.build_profile`. `calibrate_weights` makes
a model-specific weights profile (`eccokv calibrate --weights`). How the shipped
`profiles/weights.ecprof` was made and what each choice buys: docs/format.md section 6
and benchmarks/weights_profile.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eccokv.codecs.ecco_calibrate import build_profile
from eccokv.codecs.ecco_profile import Profile
from eccokv.weights.compress import activation_moments, linear_layers

GROUP = 128
# build_variant subsamples to 60000 groups: the mix is drawn to that size up front so the
# model / synthetic proportions are the ones asked for.
MAX_GROUPS = 60_000
DEFAULT_SYNTHETIC = 0.25


def weight_groups(model: nn.Module, skip: Iterable[str] | None = None,
                  importance: Mapping[str, torch.Tensor] | None = None,
                  seed: int = 0) -> np.ndarray:
    """float32 (N, 128): the full groups of the flat layout of every Linear that
    `compress_model(model, skip=skip)` would compress, layer by layer (a partial last
    group of a layer is left out).

    importance: {layer name: E[x_j^2] (in_features,)} (`activation_moments`): the groups
    are then resampled (N draws with replacement, `seed`) with probability proportional
    to the mean importance of the positions they cover (normalised per layer, as the
    encoder does), i.e. k-means sample weights by activation importance."""
    mods = dict(model.named_modules())
    out, wts = [], []
    for name in linear_layers(model, skip):
        w = mods[name].weight.detach().float()
        out_f, in_f = w.shape
        n = (out_f * in_f) // GROUP
        if not n:
            continue
        out.append(w.reshape(-1)[: n * GROUP].reshape(n, GROUP))
        if importance is not None:
            imp = importance.get(name)
            if imp is None:
                wts.append(torch.ones(n, dtype=torch.float64))
                continue
            imp = torch.as_tensor(imp, dtype=torch.float64).reshape(-1)
            m = float(imp.mean())
            imp = imp / m if m > 0 else torch.ones_like(imp)
            wts.append(imp.repeat(out_f)[: n * GROUP].reshape(n, GROUP).mean(1))
    if not out:
        return np.zeros((0, GROUP), np.float32)
    g = torch.cat(out).numpy().astype(np.float32, copy=False)
    if importance is not None:
        p = torch.cat(wts).numpy()
        p = p / p.sum() if p.sum() > 0 else np.full(len(g), 1.0 / len(g))
        g = g[np.random.default_rng(seed).choice(len(g), len(g), replace=True, p=p)]
    return g


def synthetic_weight_groups(n: int, seed: int = 0) -> np.ndarray:
    """(n, 128) float32 groups shaped like weight rows: zero-centred Gaussian, Laplace or
    Student-t (3..8 degrees of freedom) values, a small per-group offset on a quarter of
    them, a log-normal per-group scale, and on 40% of the groups 1-4 outliers of 4-12
    standard deviations (the salient weights that cost patches)."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 3, size=n)
    x = np.empty((n, GROUP))
    k0, k1, k2 = kind == 0, kind == 1, kind == 2
    x[k0] = rng.standard_normal((k0.sum(), GROUP))
    x[k1] = rng.laplace(size=(k1.sum(), GROUP)) / np.sqrt(2.0)
    dof = rng.integers(3, 9, size=k2.sum()).astype(np.float64)
    t = rng.standard_t(dof[:, None], size=(k2.sum(), GROUP))
    x[k2] = t / np.sqrt(dof / (dof - 2.0))[:, None]
    x += rng.normal(0, 0.2, size=(n, 1)) * (rng.random((n, 1)) < 0.25)
    has = rng.random(n) < 0.4
    for i in np.flatnonzero(has):
        k = rng.integers(1, 5)
        pos = rng.choice(GROUP, k, replace=False)
        x[i, pos] = rng.choice([-1.0, 1.0], k) * rng.uniform(4.0, 12.0, k)
    return (x * rng.lognormal(-4.0, 1.0, size=(n, 1))).astype(np.float32)


def _as_groups(src: nn.Module | np.ndarray, skip: Iterable[str] | None,
               importance: Mapping[str, torch.Tensor] | None) -> np.ndarray:
    if isinstance(src, nn.Module):
        return weight_groups(src, skip, importance)
    g = np.asarray(src, dtype=np.float32)
    if g.ndim != 2 or g.shape[1] != GROUP:
        raise ValueError(f"groups must have shape (N, {GROUP}), got {g.shape}")
    return g


def learn_weights_profile(models_or_groups: nn.Module | np.ndarray
                          | Sequence[nn.Module | np.ndarray],
                          variants: Sequence[str] = ("ecco4", "ecco3", "ecco2"),
                          seed: int = 0, synthetic: float = DEFAULT_SYNTHETIC,
                          max_groups: int = MAX_GROUPS, skip: Iterable[str] | None = None,
                          importance: Sequence[Mapping[str, torch.Tensor] | None] | None = None,
                          shapes: dict[str, dict[str, int]] | None = None,
                          info: dict[str, Any] | None = None,
                          progress: Callable[[str], None] | None = None) -> Profile:
    """A weights Profile from models (their `weight_groups`) and/or (N, 128) group arrays.

    Each source contributes the same number of groups (at most `max_groups * (1 -
    synthetic) / sources`, drawn without replacement; fewer if it has fewer), so a big
    model does not drown a small one; `synthetic` is the fraction of the mix made of
    `synthetic_weight_groups`. importance: per source, {layer: E[x^2]} or None (see
    `weight_groups`). shapes: per-variant {levels, patterns, codebooks} overrides."""
    if not 0 <= synthetic < 1:
        raise ValueError(f"synthetic must be a fraction in [0, 1), got {synthetic}")
    srcs = (list(models_or_groups) if isinstance(models_or_groups, (list, tuple))
            else [models_or_groups])
    if not srcs:
        raise ValueError("give at least one model or group array")
    imps = list(importance) if importance is not None else [None] * len(srcs)
    if len(imps) != len(srcs):
        raise ValueError(f"importance has {len(imps)} entries for {len(srcs)} sources")
    rng = np.random.default_rng(seed)
    per = max(1, int(max_groups * (1 - synthetic)) // len(srcs))
    parts, counts = [], []
    for s, imp in zip(srcs, imps, strict=True):
        g = _as_groups(s, skip, imp)
        if len(g) > per:
            g = g[rng.choice(len(g), per, replace=False)]
        parts.append(g)
        counts.append(int(len(g)))
    n_real = sum(counts)
    n_syn = int(round(n_real * synthetic / (1 - synthetic))) if synthetic > 0 else 0
    if n_syn:
        parts.append(synthetic_weight_groups(n_syn, seed))
    groups = np.concatenate(parts)
    meta = dict(info or {})
    meta.update({"kind": "weights", "layout": "flat (row-major W, 128 consecutive values)",
                 "groups_per_source": counts, "synthetic_groups": n_syn,
                 "synthetic_fraction": synthetic,
                 "activation_weighted_sampling": any(i is not None for i in imps)})
    return build_profile(groups, variants=variants, shapes=shapes, seed=seed, info=meta,
                         progress=progress)


def calibration_windows(tokenizer: Any, calibration_text: str | None = None,
                        corpus: str = "news", tokens: int = 512, windows: int = 4
                        ) -> list[torch.Tensor]:
    """Token-id windows (1, tokens) for activation moments: of `calibration_text` if given
    (as many whole windows as it holds, at most `windows`, else the whole text as one),
    else `windows` windows of each eccokv corpus in `corpus` ("wiki", "news", "wiki+news")."""
    if calibration_text is not None:
        ids = torch.tensor(tokenizer(calibration_text, add_special_tokens=False)["input_ids"],
                           dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("calibration_text has no tokens")
        n = min(windows, ids.numel() // tokens)
        if n < 1:
            return [ids[None]]
        return [ids[i * tokens:(i + 1) * tokens][None] for i in range(n)]
    from eccokv import data

    return [w[None] for c in corpus.split("+")
            for w in data.token_windows(tokenizer, c, window=tokens, n=windows)]


def calibrate_weights(model_name_or_path: str | nn.Module, out_path: str | Path | None,
                      calibration_text: str | None = None, corpus: str = "news",
                      tokens: int = 512, windows: int = 4,
                      calibration: Sequence[torch.Tensor] | None = None,
                      activation_weighted: bool = False,
                      variants: Sequence[str] = ("ecco4", "ecco3", "ecco2"), seed: int = 0,
                      synthetic: float = 0.0, skip: Iterable[str] | None = None,
                      shapes: dict[str, dict[str, int]] | None = None,
                      command: str | None = None, progress: bool = False
                      ) -> tuple[Profile, dict[str, Any]]:
    """A model-specific weights profile (`eccokv calibrate --weights`); saved to `out_path`
    (if not None). Returns (profile, report).

    model_name_or_path: a name `eccokv.models.load` knows, a local HF folder, or an
    nn.Module (then give `calibration` token ids, or None to sample groups uniformly).
    With `activation_weighted`, the groups are resampled by the activation moments of the
    calibration windows (`calibration_text`, else `windows` x `tokens` per corpus), so
    the tables fit best the weights whose errors the outputs feel most. Off by default:
    on SmolLM2 it changed the activation-weighted output error by 0.1%
    (benchmarks/weights_profile.md); what matters is `importance=` when compressing
    (compress_model's `calibration`), which works with any profile."""
    t0 = time.perf_counter()
    if isinstance(model_name_or_path, nn.Module):
        model, name = model_name_or_path, type(model_name_or_path).__name__
        tok = None
    else:
        from eccokv import models

        model, tok = models.load(str(model_name_or_path))
        name = str(model_name_or_path)
    imp = None
    if activation_weighted:
        if calibration is None and tok is not None:
            calibration = calibration_windows(tok, calibration_text, corpus, tokens, windows)
        if calibration is not None:
            imp = activation_moments(model, list(calibration), linear_layers(model, skip))
    steps: list[str] = []

    def step(v: str) -> None:
        steps.append(v)
        if progress:
            print(f"k-means + codebooks: {v}", flush=True)

    src = ("calibration_text" if calibration_text is not None else
           f"{windows} x {tokens} tokens per corpus of {corpus}") if tok is not None \
        else "given ids"
    info = {"model": name, "command": command or "",
            "activation_weighted": imp is not None,
            "calibration": src if imp is not None else None,
            "eccokv": __import__("eccokv").__version__}
    prof = learn_weights_profile([model], variants=variants, seed=seed, synthetic=synthetic,
                                 skip=skip, importance=[imp], shapes=shapes, info=info,
                                 progress=step)
    if out_path is not None:
        prof.save(out_path)
    report = {"model": name, "groups": prof.info.get("groups"),
              "activation_weighted": imp is not None, "synthetic_fraction": synthetic,
              "variants": list(variants), "hash": prof.hash,
              "out": None if out_path is None else str(out_path),
              "seconds": time.perf_counter() - t0}
    return prof, report


__all__ = ["calibrate_weights", "calibration_windows", "learn_weights_profile",
           "synthetic_weight_groups", "weight_groups"]
