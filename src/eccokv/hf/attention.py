"""Fused compressed attention inside transformers: `attn_implementation="eccokv"`.

`EccoCache(config, ..., fused=True)` (the default) registers the "eccokv" attention and
mask functions and switches the model's config to them. The previous implementation is
remembered inside the value itself (`_Impl`, a `str` equal to "eccokv"): the config gains
no attribute, and `_attn_implementation` is never serialised, so `save_pretrained` writes
the same config.json as without EccoCache. On each step an `EccoLayer` then returns,
instead of decoded K/V, the step's own K/V tagged with a `FusedStep` (references to the
compressed chunks, the exact sink and window as they were before the step; a layer with
nothing compressed yet, e.g. at prefill, or a step of more than 32 new tokens, e.g. a
chunked prefill, returns plain tensors). `eccokv_attention` finds the tag and runs
`eccokv.kernels.attention.fused_attention` per batch element, so `generate()` never builds
full K/V tensors. Untagged K/V (a plain cache, a sliding-window layer left to
transformers) go to the previous implementation unchanged, with its own mask function.

A lost tag is an error, never a silent fallback: the layer also records the step it
issued (per thread), and `eccokv_attention` raises `RuntimeError` if that layer's
attention then gets K/V without the tag (the model replaced them between `update` and
attention, e.g. `key_states * 1.0`, `.to()`), with the tag of another step, with only one
of K and V tagged, or modified in place (the tensors' version counters moved): attending
to the step's own tokens only would give plausible but wrong output.

Token order: the fused kernel takes compressed chunks first and one exact tail, so the
exact sink is moved behind the chunks (sink ++ window ++ step) and the mask's columns are
permuted the same way; attention is a softmax over a set of keys, so the order of keys
does not matter once the mask follows it.

A layer whose chunks the kernels do not cover (see `fused_supported`: e.g. codec "none",
"fp8", Ecco grouped over channels, or a chunk cut by `crop`) decodes instead, with a
one-time warning naming the case.
"""

from __future__ import annotations

import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

NAME = "eccokv"
_warned: set[str] = set()
_local = threading.local()  # .pending: the FusedStep issued and not yet attended to


def warn_once(case: str) -> None:
    """One warning per distinct fallback case."""
    if case not in _warned:
        _warned.add(case)
        warnings.warn(f"eccokv: no fused attention for this layer ({case}); decoding the "
                      "compressed cache for attention instead (slower, same result)",
                      stacklevel=3)


class _Impl(str):
    """The value "eccokv" (equal to NAME, same hash) carrying the implementation it
    replaced, `base`: it survives copy/deepcopy/pickle of the config, and transformers
    drops `_attn_implementation` when it serialises a config."""

    base: str

    def __new__(cls, base: str) -> _Impl:
        obj = super().__new__(cls, NAME)
        obj.base = base
        return obj

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _Impl, (self.base,)


@dataclass
class StreamView:
    """One stream (K or V) as attention sees it: chunks[i][b], then exact tails per b."""

    chunks: list[list[Any]]  # per chunk, per batch element: Compressed [H, n, D]
    tail: torch.Tensor  # [B, H, sink + window + step, D]
    sink: int  # how many of the tail's first tokens are the sink (before the chunks)
    ncomp: int = 0  # compressed tokens (the sum of the chunks' lengths)


@dataclass(eq=False)
class FusedStep:
    """What one layer's `update` hands to `eccokv_attention` for one step."""

    k: StreamView
    v: StreamView
    config_id: int = 0  # id() of the attention config of the layer that issued the step
    layer_idx: int | None = None
    versions: tuple[int, int] = field(default=(0, 0))  # of the returned K/V tensors


def issue(step: FusedStep, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Tag the K/V `update` returns with `step` and record it as this thread's pending step."""
    keys._eccokv = values._eccokv = step  # type: ignore[attr-defined]
    step.versions = (keys._version, values._version)
    _local.pending = step


def register() -> None:
    """Register "eccokv" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, eccokv_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eccokv_mask)


def enable(config: Any) -> None:
    """Switch `config` (and the model that shares it) to "eccokv" attention; nothing that
    `save_pretrained` writes changes."""
    register()
    current = getattr(config, "_attn_implementation", None) or "sdpa"
    if current != NAME:
        config._attn_implementation = _Impl(str(current))


def base_implementation(config: Any) -> str:
    """The attention implementation "eccokv" hands untagged K/V to ("sdpa" if unknown)."""
    impl = getattr(config, "_attn_implementation", None)
    return getattr(impl, "base", "sdpa")


def eccokv_mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """transformers mask function: the previous implementation's (e.g. sdpa's boolean
    mask, eager's additive one); the fused kernels take either."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    base = base_implementation(config)
    fn = ALL_MASK_ATTENTION_FUNCTIONS[base if base in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"]
    return fn(*args, config=config, **kwargs)


def _base_function(module: Any) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = base_implementation(module.config)
    if base == "eager":  # not in the registry: each model file has its own
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"eccokv: cannot find the eager attention of "
                               f"{type(module).__name__} to hand plain K/V to")
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


def _lost_tag(why: str) -> RuntimeError:
    return RuntimeError(
        f"eccokv: an EccoCache layer issued a fused attention step, but {why}. The model "
        "changed key_states/value_states between the cache update and attention (e.g. "
        "`* 1.0`, `.to()`, `.contiguous()` on a view, an in-place op); attending to them "
        "would read only this step's tokens and give wrong output. Use "
        "EccoCache(..., fused=False) for this model.")


def _take_step(module: Any, key: torch.Tensor, value: torch.Tensor) -> FusedStep | None:
    """The step this call must run fused, None for plain K/V; raises if a step was lost."""
    pending: FusedStep | None = getattr(_local, "pending", None)
    _local.pending = None
    kt, vt = getattr(key, "_eccokv", None), getattr(value, "_eccokv", None)
    if kt is None and vt is None:
        if pending is not None and pending.config_id == id(module.config) and (
                pending.layer_idx is None
                or getattr(module, "layer_idx", pending.layer_idx) == pending.layer_idx):
            raise _lost_tag("the K/V its attention received carry no tag")
        return None
    if kt is not vt:
        raise _lost_tag("only one of K and V still carries its tag")
    if kt is not pending:
        raise _lost_tag("the K/V carry the tag of another step (or of another layer)")
    if (key._version, value._version) != kt.versions:
        raise _lost_tag("the tagged K/V were modified in place")
    return kt


def _permute_mask(mask: torch.Tensor, sink: int, ncomp: int) -> torch.Tensor:
    """Columns [sink | chunks | rest] -> [chunks | sink | rest] (the fused token order)."""
    if sink == 0 or ncomp == 0:
        return mask
    return torch.cat([mask[..., sink:sink + ncomp], mask[..., :sink], mask[..., sink + ncomp:]],
                     dim=-1)


def eccokv_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None, is_causal: bool | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, Hq, Lq, D] -> ([B, Lq, Hq, D], None)."""
    step = _take_step(module, key, value)
    if step is None:
        return _base_function(module)(
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
    ncomp_k, ncomp_v = ks.ncomp, vs.ncomp
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
