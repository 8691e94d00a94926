"""What a cache layer compresses with: codec + grouping axis for K and for V, per layer.

A stream spec is a codec (name, config dict or Codec) and an axis, "tokens" (groups of
consecutive tokens of one channel: KIVI's per-channel keys) or "channels" (groups of
consecutive channels of one token: KIVI's per-token values; a group longer than head_dim
runs on into the next token's channels, so no group is padded). Cache presets name both:
"kivi2/3/4" = int2/3/4 in groups of 32, keys over tokens, values over channels, 128
exact recent tokens (the KIVI paper's layout). Any other codec name applies to K and V,
grouped over tokens (the best axis for both in `benchmarks/codec.md`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from eccokv import codecs as C
from eccokv.codecs.base import Codec

AXES = ("tokens", "channels")
DEFAULT_RESIDUAL = 128
DEFAULT_SINK = 4  # first tokens kept exact (attention sinks; measured in docs/cache.md)

# cache presets: name -> (key codec, key axis), (value codec, value axis)
CACHE_PRESETS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    f"kivi{b}": ((f"kivi{b}", "tokens"), (f"kivi{b}", "channels")) for b in (2, 3, 4)
}


@dataclass(frozen=True, eq=False)
class StreamSpec:
    """One tensor stream (K or V) of a layer: its codec and grouping axis, and optionally
    per-channel bound multipliers `row_scale` [n_kv_heads * head_dim] for a codec that
    takes them (ecco-eb over tokens: attention-aware key errors, docs/format.md); they
    shape where bits go, not the format, so chunks decode without them."""

    codec: Codec
    axis: str
    row_scale: Any = None

    def token_granularity(self, head_dim: int) -> int:
        """Tokens compressed at a time: whole groups. Over tokens, a group is `group_size`
        tokens; over channels, groups run along the token-major [H, T * head_dim] flattening
        (a group longer than head_dim spans several tokens), so whole tokens and whole
        groups line up every group_size / gcd(group_size, head_dim) tokens."""
        g = max(1, int(self.codec.group_size))
        return g if self.axis == "tokens" else g // math.gcd(g, head_dim)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"codec": self.codec.get_config(), "axis": self.axis}
        if self.row_scale is not None:
            d["row_scale"] = [round(float(v), 6) for v in self.row_scale]
        return d


@dataclass(frozen=True)
class LayerSpec:
    key: StreamSpec
    value: StreamSpec


CodecLike = str | dict | Codec
StreamLike = CodecLike | tuple[CodecLike, str]


def _codec(c: CodecLike) -> Codec:
    if isinstance(c, Codec):
        return c
    if isinstance(c, (str, dict)):
        try:
            return C.get(c)
        except KeyError as e:
            raise ValueError(f"{e.args[0]}; cache presets: {', '.join(CACHE_PRESETS)}") from None
    raise TypeError(f"a codec must be a name, a config dict or a Codec, got {type(c).__name__}")


def stream(s: StreamLike, default_axis: str, row_scale: Any = None) -> StreamSpec:
    """(codec, axis) tuple or a bare codec (axis = default_axis) -> StreamSpec."""
    if isinstance(s, StreamSpec):
        return s
    if isinstance(s, tuple):
        if len(s) != 2:
            raise ValueError(f"a stream spec tuple is (codec, axis), got {s!r}")
        codec, axis = s
    else:
        codec, axis = s, default_axis
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    c = _codec(codec)
    if row_scale is not None:
        import numpy as np

        rs = np.asarray(row_scale, dtype=np.float64).reshape(-1)
        if axis != "tokens" or not hasattr(c, "target_bits"):
            raise ValueError("row_scale needs a codec that takes it (ecco-eb) over tokens")
        if not (np.isfinite(rs).all() and (rs > 0).all()):
            raise ValueError("row_scale must be finite and > 0")
        rs.setflags(write=False)
        row_scale = rs
    return StreamSpec(c, axis, row_scale)


def layer_spec(codec: Any = "ecco4", key_codec: StreamLike | None = None,
               value_codec: StreamLike | None = None) -> LayerSpec:
    """Resolve a layer's K and V streams from a preset/codec and optional overrides."""
    if isinstance(codec, LayerSpec):
        base = codec
    elif isinstance(codec, Mapping) and ("key_codec" in codec or "value_codec" in codec):
        extra = set(codec) - {"key_codec", "value_codec", "codec"}
        if extra:
            raise ValueError(f"unknown keys in a layer spec: {sorted(extra)}")
        return layer_spec(codec.get("codec", "ecco4"), codec.get("key_codec"),
                          codec.get("value_codec"))
    elif isinstance(codec, str) and codec in CACHE_PRESETS:
        (kc, ka), (vc, va) = CACHE_PRESETS[codec]
        base = LayerSpec(stream((kc, ka), "tokens"), stream((vc, va), "tokens"))
    else:
        base = LayerSpec(stream(codec, "tokens"), stream(codec, "tokens"))
    key = stream(key_codec, "tokens") if key_codec is not None else base.key
    value = stream(value_codec, "tokens") if value_codec is not None else base.value
    return LayerSpec(key, value)


def per_layer_specs(n_layers: int, codec: Any, key_codec: StreamLike | None,
                    value_codec: StreamLike | None,
                    layers: Mapping[int, Any] | Callable[[int], Any] | None) -> list[LayerSpec]:
    """One LayerSpec per layer; `layers` overrides the default per layer index."""
    default = layer_spec(codec, key_codec, value_codec)
    if layers is None:
        return [default] * n_layers
    if callable(layers) and not isinstance(layers, Mapping):
        out = []
        for i in range(n_layers):
            s = layers(i)
            out.append(default if s is None else layer_spec(s))
        return out
    if not isinstance(layers, Mapping):
        raise TypeError("layers must be a mapping {layer index: spec} or a callable")
    bad = [k for k in layers if not isinstance(k, int) or not 0 <= k < n_layers]
    if bad:
        raise ValueError(f"layers names layer indices {bad}, but the model has layers "
                         f"0..{n_layers - 1}")
    return [layer_spec(layers[i]) if i in layers else default for i in range(n_layers)]
