"""`fp8`: FP8 e4m3 (``torch.float8_e4m3fn``) with one float32 scale per tensor.

Arrays:

* ``codes``: uint8, shape (numel,) — the e4m3 bit patterns of ``x / scale`` in C order.
  The two NaN patterns (0x7F, 0xFF) are never written and are rejected by `validate`.
* ``scale``: float32, shape (1,) — the per-tensor scale (finite, > 0).

``scale_mode``:

* ``"absmax"`` (default): ``scale = absmax / 448`` rounded to float32 (448 is the largest
  e4m3 value), nudged so that ``448 * scale`` stays finite; an all-zero tensor gets 1.
* ``"pow2"``: the smallest power of two with ``absmax / scale <= 448`` (scaling is exact).

Decoding is ``float(codes as e4m3) * scale``, written into the output dtype. The axis is
irrelevant to this codec; it is accepted and stored so the contract is uniform.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from eccokv.codecs import register
from eccokv.codecs.base import Codec, CodecError, Compressed, make_compressed

FP8_MAX = 448.0
SCALE_MODES = ("absmax", "pow2")
_F32_TINY = float(np.finfo(np.float32).smallest_subnormal)


def _absmax_scale(absmax: float) -> float:
    if absmax == 0.0:
        return 1.0
    s = np.float32(absmax / FP8_MAX)
    if s == 0.0:
        s = np.float32(_F32_TINY)
    while not np.isfinite(np.float32(s) * np.float32(FP8_MAX)):
        s = np.nextafter(s, np.float32(0.0))
    return float(s)


def _pow2_scale(absmax: float) -> float:
    if absmax == 0.0:
        return 1.0
    m, e = math.frexp(absmax / FP8_MAX)  # absmax/448 = m * 2**e, m in [0.5, 1)
    if m == 0.5:
        e -= 1
    return math.ldexp(1.0, max(e, -149))


@register
class Fp8Codec(Codec):
    """FP8 e4m3 with a per-tensor scale: 8 bits/value plus a fixed header."""

    codec_id = "fp8"

    def __init__(self, scale_mode: str = "absmax") -> None:
        if scale_mode not in SCALE_MODES:
            raise ValueError(
                f"fp8 scale_mode must be one of {', '.join(SCALE_MODES)}; got {scale_mode!r}"
            )
        self.scale_mode = scale_mode

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "scale_mode": self.scale_mode}

    def expected_arrays(self, c: Compressed) -> dict[str, tuple[Any, tuple[int, ...]]]:
        return {"codes": (np.uint8, (c.numel,)), "scale": (np.float32, (1,))}

    def validate(self, c: Compressed) -> None:
        super().validate(c)
        s = float(c.arrays["scale"][0])
        if not (math.isfinite(s) and s > 0.0):
            raise CodecError(f"fp8: invalid per-tensor scale {s}")
        codes = c.arrays["codes"]
        nnan = int(np.count_nonzero((codes & 0x7F) == 0x7F)) if codes.size else 0
        if nnan:
            raise CodecError(f"fp8: {nnan} codes are e4m3 NaN patterns (corrupt data)")

    def _encode(self, x: torch.Tensor, shape: tuple[int, ...], axis: int) -> Compressed:
        xf = x.reshape(-1).to(torch.float32)
        absmax = float(xf.abs().max()) if xf.numel() else 0.0
        scale = _absmax_scale(absmax) if self.scale_mode == "absmax" else _pow2_scale(absmax)
        q = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        codes = q.view(torch.uint8).numpy().copy()
        return make_compressed(self, shape, x.dtype, axis,
                               {"codes": codes, "scale": np.array([scale], dtype=np.float32)})

    def _decode(self, c: Compressed, out: torch.Tensor) -> None:
        codes = torch.from_numpy(c.arrays["codes"]).view(torch.float8_e4m3fn)
        vals = codes.to(torch.float32).mul_(float(c.arrays["scale"][0]))
        out.copy_(vals.reshape(out.shape))
