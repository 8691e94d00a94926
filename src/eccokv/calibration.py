"""`eccokv calibrate`: collect real K/V from a model's forward passes and learn a profile.

Groups are taken the way the cache stores them: 128 consecutive tokens of one channel
(keys and values alike) and, for robustness, 128 consecutive channels of one token.
The learning itself (k-means, codebooks) lives in `eccokv.codecs.ecco_calibrate`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from eccokv.codecs.ecco_calibrate import build_profile
from eccokv.codecs.ecco_profile import Profile


def kv_groups(kv: list[tuple[torch.Tensor, torch.Tensor]], group: int = 128) -> np.ndarray:
    """Groups (N, 128) from per-layer K, V [batch, kv_heads, tokens, head_dim]."""
    out = []
    for k, v in kv:
        for x in (k, v):
            b, h, t, d = x.shape
            tt = (t // group) * group
            if tt:  # per channel over tokens
                g = x[:, :, :tt].permute(0, 1, 3, 2).reshape(-1, group)
                out.append(g)
            flat = x.permute(0, 2, 1, 3).reshape(b * t, h * d)  # per token over channels
            cc = (h * d // group) * group
            if cc:
                out.append(flat[:, :cc].reshape(-1, group))
    return torch.cat(out).float().numpy()


def synthetic_groups(n: int, seed: int = 0) -> np.ndarray:
    """(n, 128) float32 groups from a spread of shapes seen in K/V: Gaussian, Laplace and
    Student-t(3) values with per-group offsets (channel biases) and scales."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 3, size=n)
    x = np.empty((n, 128))
    x[kind == 0] = rng.standard_normal(((kind == 0).sum(), 128))
    x[kind == 1] = rng.laplace(size=((kind == 1).sum(), 128))
    x[kind == 2] = rng.standard_t(3, size=((kind == 2).sum(), 128))
    offset = rng.normal(0, 1.0, size=(n, 1)) * (rng.random((n, 1)) < 0.5)
    return ((x + offset) * rng.lognormal(0, 1, size=(n, 1))).astype(np.float32)


def calibrate_model(model_name: str, corpus: str = "wiki+news", tokens: int = 1024,
                    windows: int = 4, variants: Sequence[str] = ("ecco4", "ecco3", "ecco2"),
                    seed: int = 0, progress: bool = True, command: str | None = None,
                    max_groups: int = 400_000,
                    synthetic: float = 0.0) -> tuple[Profile, dict[str, Any]]:
    """Learn a Profile from `model_name`'s K/V on real text; returns (profile, report).

    synthetic: fraction of the groups replaced by `synthetic_groups` (the shipped generic
    profile mixes them in so that it does not fit one model only)."""
    from tqdm import tqdm

    from eccokv import data, models
    from eccokv.hf.capture import capture_kv

    t0 = time.perf_counter()
    model, tok = models.load(model_name)
    corpora = corpus.split("+")
    jobs = [(c, w) for c in corpora for w in range(windows)]
    groups = []
    for c, w in tqdm(jobs, desc="collect K/V", disable=not progress):
        ids = data.token_windows(tok, c, window=tokens, n=windows)[w : w + 1]
        groups.append(kv_groups(capture_kv(model, ids)))
    allg = np.concatenate(groups)
    rng = np.random.default_rng(seed)
    if len(allg) > max_groups:
        allg = allg[rng.choice(len(allg), max_groups, replace=False)]
    if synthetic > 0:
        if not 0 < synthetic < 1:
            raise ValueError(f"synthetic must be a fraction in [0, 1), got {synthetic}")
        n_syn = int(len(allg) * synthetic / (1 - synthetic))
        allg = np.concatenate([allg, synthetic_groups(n_syn, seed)])
    bar = tqdm(total=len(variants), desc="k-means + codebooks", disable=not progress)

    def step(v: str) -> None:
        bar.set_postfix_str(v)
        bar.update(1)

    info = {"model": model_name, "corpus": corpus, "tokens_per_window": tokens,
            "windows": windows, "synthetic_fraction": synthetic, "command": command or "",
            "eccokv": __import__("eccokv").__version__}
    prof = build_profile(allg, variants=variants, seed=seed, info=info, progress=step)
    bar.close()
    report = {"model": model_name, "corpus": corpus, "groups": int(len(allg)),
              "synthetic_fraction": synthetic,
              "seconds": time.perf_counter() - t0, "variants": list(variants)}
    return prof, report
