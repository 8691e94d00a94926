"""Fused compressed attention inside transformers: `attn_implementation="eccokv"`.

`EccoCache(config, ..., fused=True)` (the default) registers the "eccokv" attention and
mask functions and switches the model's config to them, remembering the previous
implementation. On each step an `EccoLayer` then returns, instead of decoded K/V, the
step's own K/V tagged with a `FusedStep` (references to the compressed chunks, the exact
sink and window as they were before the step; a layer with nothing compressed yet, e.g.
at prefill, or a step of more than 32 new tokens, e.g. a chunked prefill, returns plain
tensors). `eccokv_attention` finds the tag and runs
`eccokv.kernels.attention.fused_attention` per batch element, so `generate()` never builds
full K/V tensors. Untagged K/V (a plain cache, a sliding-window layer left to
transformers) go to the previous implementation unchanged.

Token order: the fused kernel takes compressed chunks first and one exact tail, so the
exact sink is moved behind the chunks (sink ++ window ++ step) and the mask's columns are
permuted the same way; attention is a softmax over a set of keys, so the order of keys
does not matter once the mask follows it.

A layer whose chunks the kernels do not cover (see `fused_supported`: e.g. codec "none",
"fp8", Ecco grouped over channels, or a chunk cut by `crop`) decodes instead, with a
one-time warning naming the case.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

NAME = "eccokv"
_warned: set[str] = set()


def warn_once(case: str) -> None:
    """One warning per distinct fallback case."""
    if case not in _warned:
        _warned.add(case)
        warnings.warn(f"eccokv: no fused attention for this layer ({case}); decoding the "
                      "compressed cache for attention instead (slower, same result)",
                      stacklevel=3)


@dataclass
class StreamView:
    """One stream (K or V) as attention sees it: chunks[i][b], then exact tails per b."""

    chunks: list[list[Any]]  # per chunk, per batch element: Compressed [H, n, D]
    tail: torch.Tensor  # [B, H, sink + window + step, D]
    sink: int  # how many of the tail's first tokens are the sink (before the chunks)


@dataclass
class FusedStep:
    k: StreamView
    v: StreamView


def register() -> None:
    """Register "eccokv" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, eccokv_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def enable(config: Any) -> None:
    """Switch `config` (and the model that shares it) to "eccokv" attention."""
    register()
    current = getattr(config, "_attn_implementation", None) or "sdpa"
    if current != NAME:
        config._eccokv_base_attn = current
        config._attn_implementation = NAME


def _base(module: Any) -> str:
    return getattr(module.config, "_eccokv_base_attn", "sdpa")


def _permute_mask(mask: torch.Tensor, sink: int, ncomp: int) -> torch.Tensor:
    """Columns [sink | chunks | rest] -> [chunks | sink | rest] (the fused token order)."""
    if sink == 0 or ncomp == 0:
        return mask
    T = mask.shape[-1]
    order = torch.cat([torch.arange(sink, sink + ncomp), torch.arange(0, sink),
                       torch.arange(sink + ncomp, T)])
    return mask[..., order]


def eccokv_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None, is_causal: bool | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, Hq, Lq, D] -> ([B, Lq, Hq, D], None)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    step: FusedStep | None = getattr(key, "_eccokv", None)
    if step is None:
        return ALL_ATTENTION_FUNCTIONS[_base(module)](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs)
    from eccokv.kernels.attention import fused_attention

    for bad in ("softcap", "sliding_window", "s_aux"):
        if kwargs.get(bad) is not None:  # EccoCache only tags full-attention layers
            raise ValueError(f"eccokv fused attention got {bad}={kwargs[bad]!r}, which it "
                             "does not implement")
    if dropout and module.training:
        raise ValueError("eccokv fused attention is for inference (dropout > 0 in training)")
    B, Hq, Lq, D = query.shape
    scale = float(scaling) if scaling is not None else D ** -0.5
    ks, vs = step.k, step.v
    ncomp_k = sum(c[0].shape[1] for c in ks.chunks) if ks.chunks else 0
    ncomp_v = sum(c[0].shape[1] for c in vs.chunks) if vs.chunks else 0
    if (ks.sink or vs.sink) and ncomp_k != ncomp_v and attention_mask is not None:
        # both streams must agree on the token order the mask is permuted to
        raise ValueError("eccokv fused attention: K and V chunk lengths differ with a sink")
    out = torch.empty(B, Hq, Lq, D, dtype=query.dtype)
    for b in range(B):
        mask = None
        if attention_mask is not None:
            m = attention_mask[b]
            if m.dim() == 3:
                if m.shape[0] != 1:
                    raise ValueError(f"per-head masks {tuple(attention_mask.shape)} are not "
                                     "supported by eccokv fused attention")
                m = m[0]
            mask = _permute_mask(m, ks.sink, ncomp_k)
        out[b] = fused_attention(
            query[b], [c[b] for c in ks.chunks], ks.tail[b], [c[b] for c in vs.chunks],
            vs.tail[b], scaling=scale, mask=mask, num_threads=torch.get_num_threads())
    return out.transpose(1, 2).contiguous(), None
