"""`compress_model`: replace a model's `nn.Linear` layers by `EccoLinear`, in place.

Activation-aware: with `calibration` (token-id tensors), the second moment E[x_j^2] of
every input channel of every Linear is measured on those inputs (forward pre-hooks, one
pass per tensor) and weights channel j's error when the codec chooses patterns and
patches (as Ecco and AWQ do). Codecs without that option (int: round to nearest) are
encoded the same either way; `memory_report` says which layers were weighted.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from eccokv import codecs
from eccokv.weights.linear import EccoLinear

# Skipped unless `skip` says otherwise: input embeddings are not Linear layers; the LM
# head (often tied to the embeddings) is skipped by name.
DEFAULT_SKIP = ("lm_head", "*.lm_head", "embed_out", "*.embed_out")
WEIGHT_CANDIDATES = 8


def weight_codec(codec: str | dict[str, Any] | codecs.Codec) -> codecs.Codec:
    """The codec used for weights: an Ecco preset or config that names no profile gets the
    shipped weights profile (patterns and codebooks learned from weights) and tries
    `WEIGHT_CANDIDATES` patterns per group (unless it says otherwise); anything else
    (a Codec object, an explicit profile, other families) is used as given."""
    if isinstance(codec, codecs.Codec):
        return codec
    if isinstance(codec, str):
        if codec not in codecs.PRESETS:
            return codecs.get(codec)  # raises the registry's error
        cfg = dict(codecs.PRESETS[codec])
    elif isinstance(codec, dict):
        cfg = dict(codec)
        base = codecs.PRESETS.get(cfg.get("id"))
        if base is not None:
            cfg = {**base, **{k: v for k, v in cfg.items() if k != "id"}}
    else:
        raise TypeError(f"codec must be a name, a config dict or a Codec, got "
                        f"{type(codec).__name__}")
    if cfg.get("id") == "ecco" and "profile" not in cfg and "profile_hash" not in cfg:
        cfg["profile"] = "weights"
        # weights are encoded once: try 8 patterns exactly per group, not 2 (SmolLM2 ppl
        # 24.37 -> 24.22 on 4 windows, 1.6x the encode time; 32 gave 24.07 at 3.8x)
        cfg.setdefault("candidates", WEIGHT_CANDIDATES)
    return codecs.get(cfg)


def _skipped(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p for p in patterns)


def linear_layers(model: nn.Module, skip: Iterable[str] | None = None) -> list[str]:
    """Qualified names of the nn.Linear modules compress_model would replace."""
    pats = tuple(DEFAULT_SKIP if skip is None else skip)
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and not _skipped(n, pats)]


@torch.no_grad()
def activation_moments(model: nn.Module, calibration: Sequence[torch.Tensor],
                       names: Sequence[str]) -> dict[str, torch.Tensor]:
    """E[x_j^2] (float64, (in_features,)) of the input of each named Linear, over every
    token of the calibration tensors (each a (batch, seq) or (seq,) LongTensor of ids)."""
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise TypeError("calibration must be a non-empty list of token-id tensors")
    mods = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in names}

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            s = (x * x).sum(0)
            sums[name] = s if name not in sums else sums[name] + s
            counts[name] += x.shape[0]
        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for i, ids in enumerate(calibration):
            if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"calibration[{i}] must be an integer tensor of token ids, got "
                                f"{getattr(ids, 'dtype', type(ids).__name__)}")
            if ids.dim() == 1:
                ids = ids[None]
            if ids.dim() != 2 or ids.numel() == 0:
                raise ValueError(f"calibration[{i}] must be (batch, seq) token ids, got shape "
                                 f"{tuple(ids.shape)}")
            model(input_ids=ids.long())
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in names if counts[n]}


@torch.no_grad()
def compress_model(model: nn.Module, codec: str | dict[str, Any] | codecs.Codec = "ecco4",
                   calibration: Sequence[torch.Tensor] | None = None,
                   skip: Iterable[str] | None = None) -> nn.Module:
    """Replace every nn.Linear of `model` (except names matching `skip`, fnmatch patterns;
    default: the LM head) by an EccoLinear holding its weight compressed with `codec`, in
    place; returns the model. `calibration`: token-id tensors for activation-aware
    encoding (None: every channel weighted equally)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    cod = weight_codec(codec)
    names = linear_layers(model, skip)
    if not names:
        raise ValueError("the model has no nn.Linear layer to compress (after skip)")
    moments = activation_moments(model, calibration, names) if calibration is not None else {}
    mods = dict(model.named_modules())
    for name in names:
        lin = mods[name]
        new = EccoLinear.from_linear(lin, cod, importance=moments.get(name))
        parent_name, _, attr = name.rpartition(".")
        parent = mods[parent_name] if parent_name else model
        setattr(parent, attr, new)
        del lin
    model.eccokv_weights = {"codec": cod.get_config(), "skip": list(
        DEFAULT_SKIP if skip is None else skip), "activation_aware": bool(moments)}
    if hasattr(model, "config") and hasattr(model, "save_pretrained"):  # a transformers model
        from eccokv.weights.hf import attach_quant_config

        attach_quant_config(model)  # save_pretrained then writes an eccokv checkpoint
    return model


def memory_report(model: nn.Module) -> dict[str, Any]:
    """Bytes of the model's compressed Linear layers: `linear_bytes` (every byte they hold:
    compressed weights and biases), `linear_fp16_bytes` (the same weights and biases in
    fp16), their ratio, bits/weight, the bytes of everything else (`other_bytes`:
    parameters and buffers outside EccoLinear, e.g. embeddings and the LM head), and one
    entry per layer."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, EccoLinear)}
    lin = sum(m.nbytes for m in layers.values())
    wbytes = sum(m.weight_nbytes for m in layers.values())
    nw = sum(m.in_features * m.out_features for m in layers.values())
    nb = sum(0 if m.bias is None else m.out_features for m in layers.values())
    fp16 = 2 * (nw + nb)
    inside = {id(t) for m in layers.values() for t in [*m.parameters(), *m.buffers()]}
    seen: set[int] = set()
    other = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in inside or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        other += t.numel() * t.element_size()
    return {
        "layers": len(layers),
        "linear_bytes": int(lin),
        "linear_fp16_bytes": int(fp16),
        "linear_ratio_vs_fp16": lin / fp16 if fp16 else float("nan"),
        "weight_bytes": int(wbytes),
        "weights": int(nw),
        "bits_per_weight": 8.0 * wbytes / nw if nw else float("nan"),
        "other_bytes": int(other),
        "model_bytes": int(lin + other),
        "activation_aware_layers": sum(m.activation_aware for m in layers.values()),
        "per_layer": {n: {"shape": [m.out_features, m.in_features],
                          "codec": m.codec_config.get("id"), "bytes": m.nbytes,
                          "bits_per_weight": round(m.bits_per_weight, 4),
                          "fused": m.fused, "activation_aware": m.activation_aware}
                      for n, m in layers.items()},
    }
