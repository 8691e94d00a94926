"""`EccoCache`: a drop-in compressed KV cache for transformers 5.x.

    cache = EccoCache(model.config, codec="ecco4")          # or "kivi2", "int4", ...
    out = model.generate(**inputs, past_key_values=cache)
    cache.memory_report()["total_bytes"]

Each attention layer is an `EccoLayer` (a `CacheLayerMixin`). K and V are separate
streams [B, Hkv, T, D]: compressed chunks followed by an exact window of recent tokens.

- Append-only. After every update, the tokens older than the `residual_length` most
  recent ones are compressed in whole groups of both streams (G tokens: the least common
  multiple of K's and V's token granularity, e.g. 128 for Ecco, 32 for KIVI) and never
  touched again. K and V compress the same tokens. The exact window therefore holds
  between R and R + G - 1 tokens (R = residual_length). The prompt takes the same path:
  right after prefill, everything older than the window is compressed.
- A step attends to the cache as it was before the step plus the step's own tokens
  exact (like KIVI and transformers' QuantizedCache: prefill attention is exact).
- Each batch element's chunk is its own `Compressed`, so beam reordering, selection and
  repetition move references, never re-quantise, and repeated beams share storage.
- Fused attention (default, see `eccokv.hf.attention`): a decoding step hands references
  to the compressed chunks to the kernels; otherwise (fused=False, steps of more than 32
  tokens, layouts the kernels do not cover) `update` decodes the compressed part into a
  fresh tensor for the step. Nothing decoded is kept between steps.
- The exact sink and window are stored at 16 bits by default (`exact_dtype`); the step
  that adds a token attends to it unrounded.
- A failed `update` (bad shape, dtype or device, NaN/Inf, a codec error) changes nothing:
  everything is checked, and the new state computed, before the layer is changed.
- Sliding-window / chunked layers (Gemma3-style hybrids, Mistral v0.1): by default
  (`sliding="native"`) they stay transformers' own `DynamicSlidingWindowLayer`, exact:
  they hold at most one window, so there is little to save, and a rolling window would
  otherwise mean dropping tokens out of compressed groups. `sliding="compress"` makes
  them EccoLayers that keep the whole history compressed; the model's sliding-window
  mask still hides tokens older than the window, so outputs stay correct (for models
  whose window is longer than the context, e.g. Mistral's 4096, this is what saves memory).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    get_layer_types_and_kwargs,
)

from eccokv.codecs.base import Compressed
from eccokv.hf.attention import NAME as ATTN_NAME
from eccokv.hf.attention import enable as enable_fused
from eccokv.hf.spec import DEFAULT_RESIDUAL, DEFAULT_SINK, LayerSpec, StreamSpec, per_layer_specs

# Accounting: what a chunk holds besides its arrays (start, valid and compressed lengths,
# shape [H, T, D], axis, dtype, a codec reference: 8 x int32), counted like tensor storage
# is counted for DynamicCache (Python object headers are not counted for either). The
# stream's codec config is counted once, as its JSON size.
CHUNK_META_BYTES = 32
# Steps with more new tokens (chunked prefill) decode the compressed part once into a
# temporary and use the model's own attention: the fused kernels decode every block once
# per tile of 32 queries, so for long steps one decode amortised over all queries is faster.
FUSED_MAX_QUERIES = 32


class _Next:
    """A stream's state after an append, computed without changing the stream."""

    __slots__ = ("full", "held", "sink_len", "chunk", "n")

    def __init__(self, full: torch.Tensor, held: torch.Tensor, sink_len: int,
                 chunk: list[Compressed] | None, n: int) -> None:
        self.full = full  # sink ++ window ++ new, before compressing (storage dtype)
        self.held = held  # what stays exact
        self.sink_len = sink_len
        self.chunk = chunk  # the new chunk (one Compressed per batch element), or None
        self.n = n  # its tokens


class _Stream:
    """One of K or V for one layer: exact sink tokens, compressed chunks, exact window.

    held [B, H, sink + window, D] (storage dtype `exact_dtype`): the first `sink_len`
    tokens are the sink (attention sinks, kept exact: they take much of the attention mass,
    so their error weighs most; see docs/cache.md), the rest the exact window of recent
    tokens. chunks[i][b] is batch element b's Compressed [H, n_i, D] (grouped over tokens:
    axis 1; over channels: axis 2) or [H, n_i * D] (over channels when a group does not
    divide head_dim: token-major, axis 1) covering the `valid_i` tokens between;
    `valid_i < n_i` only after `crop` cut into it. Tensors are never written in place
    (a step's fused view may still reference them).
    """

    def __init__(self, spec: StreamSpec, residual: int, sink: int,
                 exact_dtype: torch.dtype | None = None) -> None:
        self.spec = spec
        self.residual = residual
        self.n_sink = sink
        self.exact_dtype = exact_dtype  # storage dtype of `held` (set at the first append)
        self.reset()

    def reset(self) -> None:
        self.chunks: list[list[Compressed]] = []
        self.valid: list[int] = []
        self.held: torch.Tensor | None = None
        self.sink_len = 0
        self.compressed_len = 0
        self.cut = False  # a chunk was cut by crop (no fused kernel for it)

    @property
    def sink(self) -> torch.Tensor | None:
        return None if self.held is None else self.held[:, :, :self.sink_len]

    @property
    def exact(self) -> torch.Tensor | None:
        """The exact window (after the sink)."""
        return None if self.held is None else self.held[:, :, self.sink_len:]

    @property
    def exact_len(self) -> int:
        return 0 if self.held is None else self.held.shape[-2] - self.sink_len

    def __len__(self) -> int:
        return (0 if self.held is None else self.held.shape[-2]) + self.compressed_len

    # -- the step's view ---------------------------------------------------------------
    def decode_into(self, out: torch.Tensor, t: int) -> int:
        """Decode every compressed token into out[:, :, t:]; returns the end position."""
        codec = self.spec.codec
        for chunk, valid in zip(self.chunks, self.valid, strict=True):
            for b, c in enumerate(chunk):
                dst = out[b, :, t:t + valid]
                if c.shape == tuple(dst.shape):
                    codec.decode(c, out=dst)
                else:  # [H, n * D] (channels, token-major) or cut by crop
                    H, D = dst.shape[0], dst.shape[-1]
                    # decoded into dst's dtype, as an uncut chunk is (not via its own
                    # storage dtype, which would round a float32 read)
                    full = codec.decode(c, out=torch.empty(c.shape, dtype=dst.dtype))
                    dst.copy_(full.reshape(H, -1, D)[:, :valid])
            t += valid
        return t

    def view_with(self, new: torch.Tensor) -> torch.Tensor:
        """[B, H, len + S, D]: sink ++ decoded chunks ++ exact window ++ `new` (this step)."""
        if self.held is None:
            return new
        if not self.chunks:
            return torch.cat([self.held, new], -2).to(new.dtype)
        B, H, S, D = new.shape
        out = torch.empty((B, H, len(self) + S, D), dtype=new.dtype)
        s = self.sink_len
        out[:, :, :s] = self.held[:, :, :s]
        t = self.decode_into(out, s)
        out[:, :, t:t + self.exact_len] = self.held[:, :, s:]
        out[:, :, t + self.exact_len:] = new
        return out

    def tail_with(self, new: torch.Tensor, nxt: _Next) -> torch.Tensor:
        """The fused kernel's exact tail [B, H, sink + window + S, D]: `new` unrounded."""
        if nxt.full.dtype == new.dtype:
            return nxt.full
        tail = nxt.full.to(new.dtype)  # the stored part, exactly
        tail[:, :, -new.shape[-2]:] = new
        return tail

    # -- appending ---------------------------------------------------------------------
    def plan(self, new: torch.Tensor, g: int) -> _Next:
        """The state after adding the step's tokens and compressing those older than the
        exact window, in multiples of `g` tokens (whole groups of both of the layer's
        streams). Changes nothing: an error (e.g. from the codec) leaves the stream as it
        was; `commit` applies the result."""
        new = new.detach()
        if self.held is None:
            full = new.to(self.exact_dtype, copy=True)
        else:
            full = torch.cat([self.held, new.to(self.exact_dtype)], dim=-2)
        s = min(self.n_sink, full.shape[-2])  # the sink fills first (see crop_to)
        n = (full.shape[-2] - s - self.residual) // g * g
        if n <= 0:
            return _Next(full, full, s, None, 0)
        old = full[:, :, s:s + n]
        B, H, _, D = full.shape
        codec = self.spec.codec
        if self.spec.row_scale is not None:
            if self.spec.row_scale.size != H * D:
                raise ValueError(f"row_scale has {self.spec.row_scale.size} entries, the "
                                 f"layer has {H} x {D} channels")
            chunk = [codec.encode(old[b], axis=1, row_scale=self.spec.row_scale)
                     for b in range(B)]
        elif self.spec.axis == "tokens":
            chunk = [codec.encode(old[b], axis=1) for b in range(B)]
        elif D % max(1, codec.group_size) == 0:  # per-token groups: [H, n, D] over axis 2
            chunk = [codec.encode(old[b], axis=2) for b in range(B)]
        else:  # groups run on into the next token: token-major [H, n * D]
            chunk = [codec.encode(old[b].reshape(H, n * D), axis=1) for b in range(B)]
        # a new tensor: frees the compressed tokens (and `full` may be a fused step's tail)
        held = torch.cat([full[:, :, :s], full[:, :, s + n:]], dim=-2)
        return _Next(full, held, s, chunk, n)

    def commit(self, nxt: _Next) -> None:
        self.held, self.sink_len = nxt.held, nxt.sink_len
        if nxt.chunk is not None:
            self.chunks.append(nxt.chunk)
            self.valid.append(nxt.n)
            self.compressed_len += nxt.n

    # -- batch / beam operations (references only, nothing re-quantised) ----------------
    def select(self, idx: list[int]) -> None:
        self.chunks = [[chunk[i] for i in idx] for chunk in self.chunks]
        if self.held is not None:
            self.held = self.held[torch.as_tensor(idx, dtype=torch.long)]

    def crop_to(self, length: int) -> None:
        """Keep the first `length` tokens."""
        s, c = self.sink_len, self.compressed_len
        if self.held is None:
            return
        if length <= s:  # into the sink: no chunks, no window (the sink refills first)
            self.held = self.held[:, :, :length].clone()
            self.sink_len = length
            self.chunks, self.valid = [], []
        elif length >= s + c:
            self.held = self.held[:, :, : length - c].clone()
        else:
            t = s
            for i, v in enumerate(self.valid):
                if t + v >= length:
                    self.chunks, self.valid = self.chunks[: i + 1], self.valid[: i + 1]
                    self.valid[i] = length - t
                    if self.valid[i] == 0:
                        self.chunks.pop()
                        self.valid.pop()
                    break
                t += v
            self.held = self.held[:, :, :s].clone()
        self.compressed_len = sum(self.valid)
        D = self.held.shape[-1]
        self.cut = any(v != _tokens(ch[0], D)
                       for v, ch in zip(self.valid, self.chunks, strict=True))

    # -- accounting --------------------------------------------------------------------
    def unique_compressed(self) -> list[Compressed]:
        seen: dict[int, Compressed] = {}
        for chunk in self.chunks:
            for c in chunk:
                seen.setdefault(id(c), c)
        return list(seen.values())


def _tokens(c: Compressed, head_dim: int) -> int:
    """Tokens a chunk holds: [H, n, D], or [H, n * D] (token-major, over channels)."""
    return c.shape[1] if len(c.shape) == 3 else c.shape[1] // head_dim


# float32 models: the exact sink and window are stored in this 16-bit type by default
# (chosen by measurement, docs/cache.md); float16/bfloat16 models keep their own dtype.
DEFAULT_EXACT_DTYPE = torch.bfloat16
EXACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
class _Unset:
    """Sentinel: not computed yet (one object, also across copies of a cache)."""

    def __copy__(self) -> _Unset:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Unset:
        return self


_UNSET = _Unset()


class EccoLayer(CacheLayerMixin):
    """One attention layer's compressed cache (see the module docstring)."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, spec: LayerSpec | None = None, residual_length: int = DEFAULT_RESIDUAL,
                 sink_tokens: int = DEFAULT_SINK, attn_config: Any = None,
                 exact_dtype: torch.dtype | None = None, layer_idx: int | None = None,
                 fused: bool = True, **kwargs: Any) -> None:
        super().__init__()
        self.attn_config = attn_config  # fused attention when it selects "eccokv"
        self.fused = bool(fused)  # False: never issue fused steps, whatever the config says
        self.layer_idx = layer_idx
        if spec is None:
            from eccokv.hf.spec import layer_spec

            spec = layer_spec("ecco4")
        if not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length must be an int >= 0, got {residual_length!r}")
        self.spec = spec
        self.residual_length = residual_length
        if not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
        self.sink_tokens = sink_tokens
        if exact_dtype is not None and exact_dtype not in EXACT_DTYPES:
            raise ValueError(f"exact_dtype must be None (16 bits: the model's dtype if it is "
                             f"float16/bfloat16, else {DEFAULT_EXACT_DTYPE}), torch.float32, "
                             f"torch.float16 or torch.bfloat16; got {exact_dtype!r}")
        self.exact_dtype = exact_dtype
        self.k = _Stream(spec.key, residual_length, sink_tokens, exact_dtype)
        self.v = _Stream(spec.value, residual_length, sink_tokens, exact_dtype)
        self.seq = 0
        self.g = 0  # tokens per compression step (set at the first update)
        self._why: Any = _UNSET  # why the kernels do not cover this layer (None: they do)

    def __deepcopy__(self, memo: dict[int, Any]) -> EccoLayer:
        """A copy of the cached data; the model's config (attn_config) stays shared, since
        it is the model's, not the cache's (`copy.deepcopy(cache)` to reuse a prompt)."""
        if self.attn_config is not None:
            memo[id(self.attn_config)] = self.attn_config
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def __repr__(self) -> str:
        return (f"EccoLayer(key={self.spec.key.codec.get_config()['id']}/{self.spec.key.axis}, "
                f"value={self.spec.value.codec.get_config()['id']}/{self.spec.value.axis}, "
                f"residual={self.residual_length}, tokens={self.seq})")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        store = self.exact_dtype
        if store is None:
            store = self.dtype if self.dtype != torch.float32 else DEFAULT_EXACT_DTYPE
        self.k.exact_dtype = self.v.exact_dtype = store
        self.g = math.lcm(self.spec.key.token_granularity(key_states.shape[-1]),
                          self.spec.value.token_granularity(value_states.shape[-1]))
        self.is_initialized = True

    def _check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Everything `update` needs of the step's K/V, before anything changes."""
        for name, x in (("K", k), ("V", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise ValueError(f"{name} states must be a tensor [batch, kv_heads, tokens, "
                                 f"head_dim], got {getattr(x, 'shape', type(x).__name__)}")
            if x.device.type != "cpu":
                raise ValueError(f"EccoCache runs on CPU; got K/V on {x.device} (move the "
                                 "model to CPU or use a plain DynamicCache)")
            if x.dtype not in EXACT_DTYPES:
                raise ValueError(f"{name} states must be float32, float16 or bfloat16, got "
                                 f"{x.dtype}")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"K {tuple(k.shape)} and V {tuple(v.shape)} differ in batch, "
                             "heads or tokens")
        if self.is_initialized:
            if k.dtype != self.dtype or v.dtype != self.dtype:
                raise ValueError(f"K/V dtype {k.dtype}/{v.dtype} differs from the {self.dtype} "
                                 "of the first update")
            held = self.k.held
            if held is not None and k.shape[0] != held.shape[0]:
                raise ValueError(f"batch size changed from {held.shape[0]} to {k.shape[0]} "
                                 "without batch_select/repeat")
            for name, x, s in (("K", k, self.k), ("V", v, self.v)):
                if s.held is not None and (x.shape[1], x.shape[3]) != (s.held.shape[1],
                                                                       s.held.shape[3]):
                    raise ValueError(f"{name} states {tuple(x.shape)}: kv_heads/head_dim "
                                     f"differ from the cache's {tuple(s.held.shape)}")
        # one sum is finite iff every value is (barring overflow: then the exact check)
        if not math.isfinite(float(k.sum() + v.sum())) and not (
                bool(torch.isfinite(k).all()) and bool(torch.isfinite(v).all())):
            raise ValueError("K/V states contain NaN or Inf; the cache is left unchanged")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the step's K/V [B, Hkv, S, D]; return this step's full K and V.

        Raises ValueError (bad shape, dtype, device, NaN/Inf) or a codec error with the
        cache exactly as it was before the call."""
        self._check(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        fused = (self._has_chunks() and key_states.shape[-2] <= FUSED_MAX_QUERIES
                 and self._fused_on() and self._fused_reason() is None)
        if not fused:
            keys = self.k.view_with(key_states)
            values = self.v.view_with(value_states)
        nk = self.k.plan(key_states, self.g)  # K and V compress the same tokens
        nv = self.v.plan(value_states, self.g)
        if fused:
            from eccokv.hf.attention import FusedStep, StreamView, issue

            step = FusedStep(
                StreamView(list(self.k.chunks), self.k.tail_with(key_states, nk),
                           self.k.sink_len, self.k.compressed_len),
                StreamView(list(self.v.chunks), self.v.tail_with(value_states, nv),
                           self.v.sink_len, self.v.compressed_len),
                config_id=id(self.attn_config), layer_idx=self.layer_idx)
        self.k.commit(nk)
        self.v.commit(nv)
        self.seq += key_states.shape[-2]
        self.keys, self.values = self.k.held, self.v.held  # exact sink + window (inspection)
        if fused:
            keys, values = key_states.view_as(key_states), value_states.view_as(value_states)
            issue(step, keys, values)  # read (and checked) by eccokv_attention
        return keys, values

    def _has_chunks(self) -> bool:
        return bool(self.k.chunks or self.v.chunks)

    # -- fused attention ---------------------------------------------------------------
    def _fused_on(self) -> bool:
        cfg = self.attn_config
        return (self.fused and cfg is not None
                and getattr(cfg, "_attn_implementation", None) == ATTN_NAME)

    def _fused_reason(self) -> str | None:
        """Why the kernels do not cover this layer's chunks (warned once), or None."""
        if self.k.cut or self.v.cut:
            from eccokv.hf.attention import warn_once

            warn_once("a compressed chunk cut by crop()")
            return "cut"
        if self._why is _UNSET:
            from eccokv.hf.attention import warn_once
            from eccokv.kernels.attention import unsupported_reason

            why = None
            for s in (self.k, self.v):
                if s.chunks and why is None:
                    c = s.chunks[0][0]
                    if len(c.shape) != 3:
                        why = (f"{s.spec.codec.get_config()['id']} grouped over channels with "
                               f"head_dim {s.held.shape[-1]} not a multiple of its group size")
                    else:
                        why = unsupported_reason(c.codec_config, c.axis)
            self._why = why
        if self._why is not None:
            from eccokv.hf.attention import warn_once

            warn_once(self._why)
        return self._why

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq + query_length, 0

    def get_seq_length(self) -> int:
        return self.seq

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.k.reset()
        self.v.reset()
        self.seq = 0
        self.keys = self.values = None
        self.is_initialized = False

    def offload(self) -> None:  # CPU only: nothing to move
        return None

    def prefetch(self) -> None:
        return None

    # -- beam search / batch -----------------------------------------------------------
    def _select(self, idx: list[int]) -> None:
        if self.seq == 0:
            return
        self.k.select(idx)
        self.v.select(idx)
        self.keys, self.values = self.k.held, self.v.held

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select([int(i) for i in beam_idx.tolist()])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        self._select([int(i) for i in idx.flatten().tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.seq == 0:
            return
        B = self.k.held.shape[0]
        self._select([b for b in range(B) for _ in range(repeats)])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (transformers passes a negative count).

        Cutting into a compressed chunk keeps it and marks fewer tokens valid: nothing is
        re-quantised."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got "
                             f"{tokens_to_remove}")
        if tokens_to_remove == 0 or self.seq == 0:
            return
        new_len = max(0, self.seq + tokens_to_remove)
        self.k.crop_to(new_len)
        self.v.crop_to(new_len)
        self.seq = new_len
        self.keys, self.values = self.k.held, self.v.held

    # -- accounting --------------------------------------------------------------------
    def memory_report(self) -> dict[str, Any]:
        """Bytes held by this layer: compressed arrays, chunk metadata, exact sink + window."""
        rep: dict[str, Any] = {"tokens": self.seq}
        total = fp16 = values = 0
        for name, s in (("key", self.k), ("value", self.v)):
            uniq = s.unique_compressed()
            comp = sum(c.payload_nbytes for c in uniq)
            meta = CHUNK_META_BYTES * len(uniq) + len(json.dumps(s.spec.codec.get_config()))
            held = s.held
            exact = 0 if held is None else held.numel() * held.element_size()
            shape = None if held is None else held.shape
            n = 0 if shape is None else shape[0] * shape[1] * len(s) * shape[3]
            rep[name] = {"compressed_bytes": comp, "metadata_bytes": meta, "exact_bytes": exact,
                         "compressed_tokens": s.compressed_len, "sink_tokens": s.sink_len,
                         "exact_tokens": s.exact_len,
                         "codec": s.spec.codec.get_config(), "axis": s.spec.axis}
            total += comp + meta + exact
            fp16 += 2 * n
            values += n
        rep.update(total_bytes=total, fp16_bytes=fp16,
                   bits_per_value=8.0 * total / values if values else 0.0)
        return rep


def _variable_rate(codec: Any, target_bits: float | None, bound: float | None,
                   bound_mode: str) -> Any:
    """The codec EccoCache's target_bits= / bound= stand for (or `codec` unchanged)."""
    if target_bits is None and bound is None:
        if bound_mode != "relative":
            raise ValueError("bound_mode needs bound=")
        return codec
    if target_bits is not None and bound is not None:
        raise ValueError("give target_bits= (a size) or bound= (an error), not both")
    if not (isinstance(codec, str) and codec == "ecco4"):
        raise ValueError(f"target_bits= / bound= choose the ecco-eb codec; do not also give "
                         f"codec={codec!r}")
    if target_bits is not None:
        return {"id": "ecco-eb", "target_bits": target_bits}
    return {"id": "ecco-eb", "bound": bound, "bound_mode": bound_mode}


class EccoCache(Cache):
    """Compressed KV cache: `model.generate(..., past_key_values=EccoCache(model.config))`.

    codec: a codec name/config/Codec for K and V, or a cache preset ("kivi2/3/4").
    key_codec / value_codec: override K or V, as a codec or a (codec, axis) tuple with
    axis "tokens" or "channels". layers: {layer index: spec} or a callable index -> spec
    (None = the default), where a spec is a codec/preset or a dict with key_codec /
    value_codec. residual_length: recent tokens kept exact (default 128). sink_tokens:
    first tokens kept exact (attention sinks). sliding:
    "native" (sliding-window layers stay transformers' exact DynamicSlidingWindowLayer) or
    "compress" (they become EccoLayers keeping the whole history; the mask hides the rest).
    fused: attend straight from the compressed cache (switches the model's attention
    implementation to "eccokv", which hands every other cache to the previous one; nothing
    `save_pretrained` writes changes); False decodes the compressed part into a temporary
    tensor at every step.
    exact_dtype: storage dtype of the exact sink and window. Default: 16 bits (the model's
    dtype if float16/bfloat16, else bfloat16: half the bytes of float32, values rounded
    once, see docs/cache.md); torch.float32 keeps a float32 model's values unrounded.
    target_bits: the error-bounded variable-rate codec ("ecco-eb") for K and V, each chunk
    at this bits/value (every byte counted); bound: the same codec with a stated error
    instead, |x - x_hat| <= bound * (range of the value's group of 128) (bound_mode
    "relative", the default) or <= bound ("absolute"). Either replaces `codec`.
    """

    def __init__(self, config: Any, codec: Any = "ecco4", *, key_codec: Any = None,
                 value_codec: Any = None, residual_length: int | None = None,
                 sink_tokens: int | None = None,
                 layers: Mapping[int, Any] | Callable[[int], Any] | None = None,
                 sliding: str = "native", fused: bool = True,
                 exact_dtype: torch.dtype | None = None, target_bits: float | None = None,
                 bound: float | None = None, bound_mode: str = "relative") -> None:
        if config is None:
            raise ValueError("EccoCache needs the model config (model.config)")
        codec = _variable_rate(codec, target_bits, bound, bound_mode)
        residual = DEFAULT_RESIDUAL if residual_length is None else residual_length
        sink = DEFAULT_SINK if sink_tokens is None else sink_tokens
        if not isinstance(sink, int) or isinstance(sink, bool) or sink < 0:
            raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
        if not isinstance(residual, int) or isinstance(residual, bool) or residual < 0:
            raise ValueError(f"residual_length must be an int >= 0, got {residual_length!r}")
        if sliding not in ("native", "compress"):
            raise ValueError(f"sliding must be 'native' or 'compress', got {sliding!r}")
        text = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        ours = {"full_attention"} | (
            {"sliding_attention", "chunked_attention"} if sliding == "compress" else set())
        specs = per_layer_specs(len(layer_types), codec, key_codec, value_codec, layers)
        if isinstance(layers, Mapping):
            own = [i for i in layers if layer_types[i] not in ours]
            if own:
                raise ValueError(f"layers {own} are {[layer_types[i] for i in own]} layers, "
                                 "which EccoCache leaves to transformers' own layer type; "
                                 "they cannot take a codec")
        built: list[CacheLayerMixin] = []
        for i, (ltype, kw, spec) in enumerate(zip(layer_types, layer_kwargs, specs,
                                                  strict=True)):
            if ltype in ours:
                built.append(EccoLayer(spec, residual, sink, attn_config=text,
                                       exact_dtype=exact_dtype, layer_idx=i, fused=fused))
            elif ltype in DYNAMIC_LAYER_TYPE_MAPPING:
                built.append(DYNAMIC_LAYER_TYPE_MAPPING[ltype](**kw))
            else:
                raise ValueError(f"EccoCache does not know layer type {ltype!r}")
        self.residual_length = residual
        self.sink_tokens = sink
        if fused:
            enable_fused(text)
        super().__init__(layers=built)

    # token ids the cache was built from, when known (from_store / load set them)
    token_ids: torch.Tensor | None = None
    store_chunk_tokens: int | None = None  # chunk size from_store used

    def save(self, path: Any, token_ids: Any = None) -> None:
        """Write the cache to `path` (atomic; format: eccokv.hf.persist)."""
        from eccokv.hf import persist

        persist.save(self, path, token_ids)

    @classmethod
    def load(cls, path: Any, config: Any, **cache_kwargs: Any) -> EccoCache:
        """A cache saved by `save`; refuses another model or codec version (CacheFileError).
        cache_kwargs override settings that do not change the data (e.g. fused=False)."""
        from eccokv.hf import persist

        return persist.load(path, config, **cache_kwargs)

    @classmethod
    def from_store(cls, store: Any, model: Any, input_ids: Any, *,
                   chunk_tokens: int | None = None, **cache_kwargs: Any) -> EccoCache:
        """EccoCache(model.config, **cache_kwargs) holding the longest prefix of
        input_ids [1, T] found in `store` (`get_seq_length()` tokens; a store that is down
        gives an empty cache with a warning). See eccokv.store.prefix."""
        from eccokv.store.prefix import lookup

        cache = lookup(store, model, input_ids, chunk_tokens, **cache_kwargs)
        cache.store_chunk_tokens = chunk_tokens
        return cache

    def to_store(self, store: Any, token_ids: Any = None) -> int:
        """Write the full compressed chunks not yet in `store`; returns how many landed."""
        from eccokv.store.prefix import write

        return write(self, store, token_ids, self.store_chunk_tokens)

    def memory_report(self) -> dict[str, Any]:
        """{"total_bytes", "fp16_bytes", "bits_per_value", "layers": [per layer]}.

        total_bytes counts every byte held (compressed chunks with their metadata, exact
        windows, and the plain tensors of layers left uncompressed); fp16_bytes is the
        same tokens in an fp16 cache."""
        per = []
        total = fp16 = 0
        for i, layer in enumerate(self.layers):
            if isinstance(layer, EccoLayer):
                r = layer.memory_report()
            else:
                k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
                held = sum(t.numel() * t.element_size() for t in (k, v)
                           if isinstance(t, torch.Tensor))
                n = sum(t.numel() for t in (k, v) if isinstance(t, torch.Tensor))
                r = {"tokens": layer.get_seq_length(), "type": type(layer).__name__,
                     "total_bytes": held, "fp16_bytes": 2 * n,
                     "bits_per_value": 8.0 * held / n if n else 0.0}
            r["layer"] = i
            per.append(r)
            total += r["total_bytes"]
            fp16 += r["fp16_bytes"]
        return {"total_bytes": total, "fp16_bytes": fp16,
                "bits_per_value": 16.0 * total / fp16 if fp16 else 0.0,
                "ratio_vs_fp16": total / fp16 if fp16 else 0.0, "layers": per}


def kv_bytes(cache: Cache) -> dict[str, int]:
    """{"kv_bytes": bytes a cache holds for K/V, "fp16_bytes": the same tokens in fp16}:
    EccoCache through `memory_report()`, any other cache from its layers' tensors."""
    if isinstance(cache, EccoCache):
        rep = cache.memory_report()
        return {"kv_bytes": int(rep["total_bytes"]), "fp16_bytes": int(rep["fp16_bytes"])}
    held = n = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor):
                held += t.numel() * t.element_size()
                n += t.numel()
    return {"kv_bytes": held, "fp16_bytes": 2 * n}
