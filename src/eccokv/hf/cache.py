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
- Until fused attention is used, `update` decodes the compressed part into a fresh
  tensor for the step; nothing decoded is kept between steps.
- Sliding-window / chunked layers (Gemma3-style hybrids, Mistral v0.1): by default
  (`sliding="native"`) they stay transformers' own `DynamicSlidingWindowLayer`, exact:
  they hold at most one window, so there is little to save, and a rolling window would
  otherwise mean dropping tokens out of compressed groups. `sliding="compress"` makes
  them EccoLayers that keep the whole history compressed; the model's sliding-window
  mask still hides tokens older than the window, so outputs stay correct (for models
  whose window is longer than the context, e.g. Mistral's 4096, this is what saves memory).
"""

from __future__ import annotations

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


class _Stream:
    """One of K or V for one layer: exact sink tokens, compressed chunks, exact window.

    sink [B, H, <= n_sink, D]: the first tokens, kept exact (attention sinks: they take
    much of the attention mass, so their error weighs most; see docs/cache.md).
    chunks[i][b] is batch element b's Compressed [H, n_i, D] (grouped over tokens: axis 1;
    over channels: axis 2) or [H, n_i * D] (over channels when a group does not divide
    head_dim: token-major, axis 1) covering the next `valid_i` tokens; `valid_i < n_i`
    only after `crop` cut into it. exact [B, H, Te, D]: the rest.
    """

    def __init__(self, spec: StreamSpec, residual: int, sink: int,
                 exact_dtype: torch.dtype | None = None) -> None:
        self.spec = spec
        self.residual = residual
        self.n_sink = sink
        self.exact_dtype = exact_dtype
        self.reset()

    def reset(self) -> None:
        self.chunks: list[list[Compressed]] = []
        self.valid: list[int] = []
        self.sink: torch.Tensor | None = None
        self.exact: torch.Tensor | None = None

    @property
    def compressed_len(self) -> int:
        return sum(self.valid)

    @property
    def sink_len(self) -> int:
        return 0 if self.sink is None else self.sink.shape[-2]

    @property
    def exact_len(self) -> int:
        return 0 if self.exact is None else self.exact.shape[-2]

    def __len__(self) -> int:
        return self.sink_len + self.compressed_len + self.exact_len

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
                    dst.copy_(codec.decode(c).reshape(H, -1, D)[:, :valid])
            t += valid
        return t

    def view_with(self, new: torch.Tensor) -> torch.Tensor:
        """[B, H, len + S, D]: sink ++ decoded chunks ++ exact window ++ `new` (this step)."""
        parts = [x for x in (self.sink, self.exact) if x is not None]
        if not self.chunks:
            return torch.cat([x.to(new.dtype) for x in parts] + [new], -2) if parts else new
        B, H, S, D = new.shape
        out = torch.empty((B, H, len(self) + S, D), dtype=new.dtype)
        t = self.sink_len
        if t:
            out[:, :, :t] = self.sink
        t = self.decode_into(out, t)
        out[:, :, t:t + self.exact_len] = self.exact
        out[:, :, t + self.exact_len:] = new
        return out

    # -- appending ---------------------------------------------------------------------
    def append(self, new: torch.Tensor, g: int) -> None:
        """Add the step's tokens, then compress the tokens older than the exact window, in
        multiples of `g` tokens (whole groups of both of the layer's streams)."""
        new = new.detach()
        if self.exact_dtype is not None:
            new = new.to(self.exact_dtype)
        self.exact = new.clone() if self.exact is None else torch.cat([self.exact, new], dim=-2)
        need = self.n_sink - self.sink_len
        if need > 0:
            take = self.exact[:, :, :need]
            self.sink = take.clone() if self.sink is None else torch.cat([self.sink, take], -2)
            self.exact = self.exact[:, :, need:].clone()
        B, H, _, D = self.exact.shape
        n = (self.exact_len - self.residual) // g * g
        if n <= 0:
            return
        old = self.exact[:, :, :n]
        codec = self.spec.codec
        if self.spec.axis == "tokens":
            chunk = [codec.encode(old[b], axis=1) for b in range(B)]
        elif D % max(1, codec.group_size) == 0:  # per-token groups: [H, n, D] over axis 2
            chunk = [codec.encode(old[b], axis=2) for b in range(B)]
        else:  # groups run on into the next token: token-major [H, n * D]
            chunk = [codec.encode(old[b].reshape(H, n * D), axis=1) for b in range(B)]
        self.chunks.append(chunk)
        self.valid.append(n)
        self.exact = self.exact[:, :, n:].clone()  # clone: free the compressed tokens

    # -- batch / beam operations (references only, nothing re-quantised) ----------------
    def select(self, idx: list[int]) -> None:
        self.chunks = [[chunk[i] for i in idx] for chunk in self.chunks]
        ix = torch.as_tensor(idx, dtype=torch.long)
        if self.exact is not None:
            self.exact = self.exact[ix]
        if self.sink is not None:
            self.sink = self.sink[ix]

    def crop_to(self, length: int) -> None:
        """Keep the first `length` tokens."""
        s, c = self.sink_len, self.compressed_len
        if length <= s:
            self.sink = self.sink[:, :, :length].clone()
            self.chunks, self.valid = [], []
            self.exact = self.exact[:, :, :0].clone()
            return
        if length >= s + c:
            self.exact = self.exact[:, :, : length - s - c].clone()
            return
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
        self.exact = self.exact[:, :, :0].clone()

    # -- accounting --------------------------------------------------------------------
    def unique_compressed(self) -> list[Compressed]:
        seen: dict[int, Compressed] = {}
        for chunk in self.chunks:
            for c in chunk:
                seen.setdefault(id(c), c)
        return list(seen.values())


class EccoLayer(CacheLayerMixin):
    """One attention layer's compressed cache (see the module docstring)."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, spec: LayerSpec | None = None, residual_length: int = DEFAULT_RESIDUAL,
                 sink_tokens: int = DEFAULT_SINK, attn_config: Any = None,
                 exact_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.attn_config = attn_config  # fused attention when it selects "eccokv"
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
        if exact_dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"exact_dtype must be None (the model's dtype), torch.float32, "
                             f"torch.float16 or torch.bfloat16; got {exact_dtype!r}")
        self.k = _Stream(spec.key, residual_length, sink_tokens, exact_dtype)
        self.v = _Stream(spec.value, residual_length, sink_tokens, exact_dtype)
        self.seq = 0

    def __repr__(self) -> str:
        return (f"EccoLayer(key={self.spec.key.codec.get_config()['id']}/{self.spec.key.axis}, "
                f"value={self.spec.value.codec.get_config()['id']}/{self.spec.value.axis}, "
                f"residual={self.residual_length}, tokens={self.seq})")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.device.type != "cpu":
            raise ValueError(f"EccoCache runs on CPU; got K/V on {key_states.device} "
                             "(move the model to CPU or use a plain DynamicCache)")
        if key_states.dim() != 4 or value_states.dim() != 4:
            raise ValueError("K/V states must be [batch, kv_heads, tokens, head_dim], got "
                             f"{tuple(key_states.shape)} / {tuple(value_states.shape)}")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the step's K/V [B, Hkv, S, D]; return this step's full K and V."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[:3] != value_states.shape[:3]:
            raise ValueError(f"K {tuple(key_states.shape)} and V {tuple(value_states.shape)} "
                             "differ in batch, heads or tokens")
        if self.seq and key_states.shape[0] != self.k.exact.shape[0]:
            raise ValueError(f"batch size changed from {self.k.exact.shape[0]} to "
                             f"{key_states.shape[0]} without batch_select/repeat")
        fused = (self._fused_on() and bool(self.k.chunks or self.v.chunks)
                 and key_states.shape[-2] <= FUSED_MAX_QUERIES)
        step = self._fused_step(key_states, value_states) if fused else None
        if step is not None:
            keys, values = key_states.view_as(key_states), value_states.view_as(value_states)
            keys._eccokv = values._eccokv = step  # read by eccokv_attention
        else:
            keys = self.k.view_with(key_states)
            values = self.v.view_with(value_states)
        g = math.lcm(self.spec.key.token_granularity(key_states.shape[-1]),
                     self.spec.value.token_granularity(value_states.shape[-1]))
        self.k.append(key_states, g)  # K and V compress the same tokens: one token order
        self.v.append(value_states, g)
        self.seq += key_states.shape[-2]
        self.keys, self.values = self.k.exact, self.v.exact  # the exact window (for inspection)
        return keys, values

    # -- fused attention ---------------------------------------------------------------
    def _fused_on(self) -> bool:
        cfg = self.attn_config
        return cfg is not None and getattr(cfg, "_attn_implementation", None) == ATTN_NAME

    def _fused_step(self, key_states: torch.Tensor, value_states: torch.Tensor) -> Any:
        """The step for `eccokv_attention` (references, before this step's append), or None
        (with a one-time warning naming the case) if the kernels do not cover the chunks."""
        from eccokv.hf.attention import FusedStep, StreamView, warn_once
        from eccokv.kernels.attention import unsupported_reason

        views = []
        for s, new in ((self.k, key_states), (self.v, value_states)):
            if s.chunks:
                c = s.chunks[0][0]
                if len(c.shape) != 3:
                    warn_once(f"{s.spec.codec.get_config()['id']} grouped over channels with "
                              f"head_dim {new.shape[-1]} not a multiple of its group size")
                    return None
                why = unsupported_reason(c.codec_config, c.axis)
                if why is not None:
                    warn_once(why)
                    return None
                if any(v != ch[0].shape[1] for v, ch in zip(s.valid, s.chunks, strict=True)):
                    warn_once("a compressed chunk cut by crop()")
                    return None
            tail = [x.to(new.dtype) for x in (s.sink, s.exact) if x is not None] + [new]
            views.append(StreamView(list(s.chunks), torch.cat(tail, dim=-2), s.sink_len))
        return FusedStep(*views)

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
        self.keys, self.values = self.k.exact, self.v.exact

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
        B = self.k.exact.shape[0]
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
        self.keys, self.values = self.k.exact, self.v.exact

    # -- accounting --------------------------------------------------------------------
    def memory_report(self) -> dict[str, Any]:
        """Bytes held by this layer: compressed arrays, chunk metadata, exact sink + window."""
        rep: dict[str, Any] = {"tokens": self.seq}
        total = fp16 = values = 0
        for name, s in (("key", self.k), ("value", self.v)):
            uniq = s.unique_compressed()
            comp = sum(c.payload_nbytes for c in uniq)
            meta = CHUNK_META_BYTES * len(uniq) + len(json.dumps(s.spec.codec.get_config()))
            exact = sum(x.numel() * x.element_size() for x in (s.sink, s.exact)
                        if x is not None)
            shape = None if s.exact is None else s.exact.shape
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
    fused: attend straight from the compressed cache (switches the model's config to the
    "eccokv" attention, which hands every other cache to the previous implementation);
    False decodes the compressed part into a temporary tensor at every step.
    exact_dtype: storage dtype of the exact sink and window (default: the model's); e.g.
    torch.float16 halves their bytes for a float32 model (values rounded to fp16).
    """

    def __init__(self, config: Any, codec: Any = "ecco4", *, key_codec: Any = None,
                 value_codec: Any = None, residual_length: int | None = None,
                 sink_tokens: int | None = None,
                 layers: Mapping[int, Any] | Callable[[int], Any] | None = None,
                 sliding: str = "native", fused: bool = True,
                 exact_dtype: torch.dtype | None = None) -> None:
        if config is None:
            raise ValueError("EccoCache needs the model config (model.config)")
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
        for ltype, kw, spec in zip(layer_types, layer_kwargs, specs, strict=True):
            if ltype in ours:
                built.append(EccoLayer(spec, residual, sink, attn_config=text,
                                       exact_dtype=exact_dtype))
            elif ltype in DYNAMIC_LAYER_TYPE_MAPPING:
                built.append(DYNAMIC_LAYER_TYPE_MAPPING[ltype](**kw))
            else:
                raise ValueError(f"EccoCache does not know layer type {ltype!r}")
        self.residual_length = residual
        self.sink_tokens = sink
        if fused:
            enable_fused(text)
        super().__init__(layers=built)

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
