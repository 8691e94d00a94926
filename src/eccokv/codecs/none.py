"""`none`: the uncompressed reference. Stores the raw values in the input dtype."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from eccokv.codecs import register
from eccokv.codecs.base import Codec, Compressed, make_compressed


@register
class NoneCodec(Codec):
    """Stores the tensor's bytes unchanged (16 bits/value for fp16/bf16, 32 for fp32)."""

    codec_id = "none"

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id}

    def expected_arrays(self, c: Compressed) -> dict[str, tuple[Any, tuple[int, ...]]]:
        itemsize = torch.empty((), dtype=c.dtype).element_size()
        return {"raw": (np.uint8, (c.numel * itemsize,))}

    def _encode(self, x: torch.Tensor, shape: tuple[int, ...], axis: int) -> Compressed:
        raw = x.reshape(-1).view(torch.uint8).numpy().copy()
        return make_compressed(self, shape, x.dtype, axis, {"raw": raw})

    def _decode(self, c: Compressed, out: torch.Tensor) -> None:
        t = torch.from_numpy(c.arrays["raw"].copy()).view(c.dtype).reshape(c.shape)
        out.copy_(t)
