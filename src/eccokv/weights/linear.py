"""`EccoLinear`: an `nn.Linear` whose weight is held as compressed blocks.

Weight layout ("flat"): the row-major weight W (out_features, in_features) is read as one
sequence of out * in values and cut into groups of `codec.group_size` consecutive values
(128 for Ecco): groups lie along the input dimension of each output row and cross into
the next row only when in_features is not a multiple of 128, so a matrix wastes at most
one partial block (ecco4 is 4.00 bits/weight at any in_features; HQQ groups the same way).

Forward, y = x W^T + b for x (..., in_features):
- Ecco codecs, up to `gemv_max_tokens` rows of x: the fused decode-GEMV
  (`kernels.gemv_numba`), which reads W straight from the blocks and never writes it out;
- more rows (prefill), or any other codec: W is decoded tile by tile into a reused
  per-thread buffer and multiplied with torch's matmul.
Both compute in float32 and return x's dtype. Inference only (no gradients).

The compressed arrays are uint8 buffers holding their raw bytes (`w_<name>`), so
`model.to(dtype)` never casts them and a state dict saves them as they are; their numpy
dtypes and shapes, the codec config and the metadata are plain attributes
(`compressed_spec()`), stored by the checkpoint code next to the state dict.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch
from torch import nn

from eccokv import codecs
from eccokv.codecs.base import DTYPE_BY_NAME, SUPPORTED_DTYPES, CodecError, Compressed

# Rows of x up to which the fused decode-GEMV runs (more: decode tiles + matmul). Measured
# by `eccokv bench weights` (benchmarks/weights-kernel.md): the decode-GEMV wins up to
# 8 rows everywhere, tiled decode + matmul from 16 (some shapes) or 32 (the others).
GEMV_MAX_TOKENS = 12
TILE_VALUES = 1 << 20  # values per decoded tile of the prefill path (4 MB of float32)

_scratch = threading.local()


def _buffer(n: int) -> torch.Tensor:
    """A per-thread float32 scratch buffer of at least n values (grown, reused)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, 1), dtype=torch.float32)
        _scratch.buf = buf
    return buf[:n]


def _as_array(buf: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The numpy array whose raw bytes are the uint8 buffer `buf` (zero-copy if aligned)."""
    a = buf.detach().cpu().numpy()
    dt = np.dtype(dtype)
    if a.ctypes.data % dt.alignment:
        a = a.copy()  # e.g. a tensor mapped at an odd file offset
    return a.view(dt).reshape(shape)


class EccoLinear(nn.Module):
    """Linear layer with a compressed weight (see the module docstring).

    Build with `EccoLinear.from_linear(linear, codec, importance=None)`; `importance`
    (in_features,) weights each input channel's error in the encoder (E[x_j^2])."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 codec_config: dict[str, Any], dtype: torch.dtype,
                 arrays: dict[str, tuple[str, tuple[int, ...]]], meta: dict[str, Any] | None = None,
                 activation_aware: bool = False) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"EccoLinear needs positive sizes, got "
                             f"({out_features}, {in_features})")
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"weight dtype {dtype} is not supported")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.codec_config = dict(codec_config)
        self.codec = codecs.get(self.codec_config)
        self.weight_dtype = dtype
        self.meta = dict(meta or {})
        self.activation_aware = bool(activation_aware)
        self.array_specs = {k: (str(np.dtype(d)), tuple(int(s) for s in shp))
                            for k, (d, shp) in arrays.items()}
        for name, (d, shp) in self.array_specs.items():
            nbytes = np.dtype(d).itemsize * math.prod(shp)
            self.register_buffer(f"w_{name}", torch.zeros(nbytes, dtype=torch.uint8))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.gemv_max_tokens = GEMV_MAX_TOKENS
        self._views: tuple[int, dict[str, np.ndarray]] | None = None
        self._gemv_state: tuple[Any, ...] | None = None

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, codec: str | dict[str, Any] | codecs.Codec,
                    importance: torch.Tensor | None = None) -> EccoLinear:
        """Compress `linear`'s weight (any supported float dtype) with `codec`."""
        w = linear.weight.detach()
        if w.dim() != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
        cod = codecs.get(codec)
        out_f, in_f = w.shape
        flat = w.reshape(-1)
        aware = False
        if importance is not None and cod.supports_importance:
            imp = torch.as_tensor(importance, dtype=torch.float64).reshape(-1)
            if imp.numel() != in_f:
                raise ValueError(f"importance has {imp.numel()} values for {in_f} input "
                                 "features")
            c = cod.encode(flat, axis=0, importance=imp.repeat(out_f))
            aware = True
        else:
            c = cod.encode(flat, axis=0)
        mod = cls(in_f, out_f, linear.bias is not None, c.codec_config, w.dtype,
                  {k: (a.dtype.str, a.shape) for k, a in c.arrays.items()}, c.meta, aware)
        mod.load_compressed(c)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def load_compressed(self, c: Compressed) -> None:
        """Copy the arrays of `c` (validated against this layer's codec and shape) in."""
        if tuple(c.shape) != (self.out_features * self.in_features,) or c.axis != 0:
            raise CodecError(f"compressed weight has shape {c.shape} axis {c.axis}; this "
                             f"layer holds {self.out_features} x {self.in_features} (flat)")
        self.codec.check_compatible(c)
        self.codec.validate(c)
        if set(c.arrays) != set(self.array_specs):
            raise CodecError(f"compressed arrays {sorted(c.arrays)} do not match the layer's "
                             f"{sorted(self.array_specs)}")
        for name, a in c.arrays.items():
            buf = getattr(self, f"w_{name}")
            raw = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
            if raw.size != buf.numel():
                raise CodecError(f"array {name!r} has {raw.size} bytes, the layer expects "
                                 f"{buf.numel()}")
            buf.copy_(torch.from_numpy(raw.copy()))
        self.meta = dict(c.meta)
        self.weight_dtype = c.dtype
        self._views = None
        self._gemv_state = None

    def compressed(self) -> Compressed:
        """The weight as a `Compressed` (flat layout), validated (raises CodecError)."""
        c = Compressed(dict(self.codec_config), (self.out_features * self.in_features,),
                       self.weight_dtype, 0, dict(self._arrays()), dict(self.meta))
        self.codec.check_compatible(c)
        self.codec.validate(c)
        return c

    def compressed_spec(self) -> dict[str, Any]:
        """What a checkpoint stores next to the buffers to rebuild this layer."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "codec": self.codec_config,
                "dtype": SUPPORTED_DTYPES[self.weight_dtype],
                "arrays": {k: [d, list(s)] for k, (d, s) in self.array_specs.items()},
                "meta": self.meta, "activation_aware": self.activation_aware}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> EccoLinear:
        """An empty layer (zero buffers) with the shapes `spec` names; fill it with
        `load_state_dict`, then call `check()`."""
        try:
            dtype = DTYPE_BY_NAME[spec["dtype"]]
            arrays = {k: (str(v[0]), tuple(int(s) for s in v[1]))
                      for k, v in spec["arrays"].items()}
            return cls(int(spec["in_features"]), int(spec["out_features"]), bool(spec["bias"]),
                       dict(spec["codec"]), dtype, arrays, dict(spec.get("meta") or {}),
                       bool(spec.get("activation_aware", False)))
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise CodecError(f"invalid EccoLinear spec ({type(e).__name__}: {e})") from None

    # -- arrays --------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        key = sum(getattr(self, f"w_{k}").data_ptr() for k in self.array_specs)
        if self._views is None or self._views[0] != key:
            self._views = (key, {k: _as_array(getattr(self, f"w_{k}"), d, s)
                                 for k, (d, s) in self.array_specs.items()})
        return self._views[1]

    @property
    def fused(self) -> bool:
        """Whether decode steps run the fused decode-GEMV (Ecco codecs)."""
        return self.codec_config.get("id") == "ecco"

    @property
    def weight_nbytes(self) -> int:
        """Every byte of the compressed weight (all its arrays)."""
        return int(sum(getattr(self, f"w_{k}").numel() for k in self.array_specs))

    @property
    def nbytes(self) -> int:
        """Every byte this layer holds: the compressed weight and the bias."""
        b = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.weight_nbytes + b

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_nbytes / (self.in_features * self.out_features)

    def check(self) -> None:
        """Validate the arrays and decode every block once (CodecError if corrupt)."""
        self.dequantize()

    # -- compute -------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded weight (out_features, in_features) as a new tensor."""
        out = torch.empty(self.out_features, self.in_features, dtype=torch.float32)
        for r0, r1, tile in self._tiles():
            out[r0:r1] = tile
        return out.to(dtype)

    def _tiles(self):
        """(row0, row1, float32 tile (row1-row0, in)) over W, decoded into the reused buffer."""
        n_in, n_out = self.in_features, self.out_features
        c = self.compressed()  # validated: every array size before any kernel runs
        if not self.fused:
            w = self.codec.decode(c, out=_buffer(n_in * n_out))
            yield 0, n_out, w.view(n_out, n_in)
            return
        from eccokv.kernels.ecco_numba import decode_blocks

        arrs = c.arrays
        words, tsc = arrs["blocks"], float(arrs["tscale"][0])
        kt = self.codec.kernel_tables()
        unit = 128 // math.gcd(n_in, 128)
        rows = max(unit, (TILE_VALUES // n_in) // unit * unit)
        W = self.codec.words
        for r0 in range(0, n_out, rows):
            r1 = min(n_out, r0 + rows)
            b0, b1 = r0 * n_in // 128, -(-(r1 * n_in) // 128)
            nb = b1 - b0
            buf = _buffer(nb * 128)
            bad = np.zeros(nb, np.uint8)
            # blocks b0 .. b1-1 as nb rows of one group each: four decoded side by side
            decode_blocks(words[b0 * W:b1 * W + 1], nb, kt, np.float64(tsc), 128, 1, 1,
                          buf.numpy(), 0, bad)
            if bad.any():
                raise CodecError(f"{int(bad.sum())} corrupt blocks in a compressed weight "
                                 f"({n_out} x {n_in})")
            k0 = r0 * n_in - b0 * 128
            yield r0, r1, buf[k0:k0 + (r1 - r0) * n_in].view(r1 - r0, n_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_in, n_out = self.in_features, self.out_features
        if x.shape[-1] != n_in:
            raise ValueError(f"input has {x.shape[-1]} features, EccoLinear expects {n_in}")
        lead = x.shape[:-1]
        xf = x.detach().reshape(-1, n_in)
        if xf.dtype != torch.float32:
            xf = xf.to(torch.float32)
        xf = xf.contiguous()
        T = xf.shape[0]
        if self.fused and 0 < T <= self.gemv_max_tokens:
            y = self._gemv(xf)
        else:
            y = torch.empty(T, n_out, dtype=torch.float32)
            for r0, r1, tile in self._tiles():
                if r1 - r0 == n_out:
                    torch.matmul(xf, tile.t(), out=y)
                else:
                    y[:, r0:r1] = xf @ tile.t()
        if self.bias is not None:
            y += self.bias if self.bias.dtype == torch.float32 else self.bias.float()
        return (y if x.dtype == torch.float32 else y.to(x.dtype)).reshape(*lead, n_out)

    def _gemv(self, xf: torch.Tensor) -> torch.Tensor:
        """The fused decode-GEMV: (T, in) float32 -> (T, out) float32."""
        from eccokv.kernels.gemv_numba import gemv_blocks

        key = sum(getattr(self, f"w_{k}").data_ptr() for k in self.array_specs)
        st = self._gemv_state
        if st is None or st[0] != key:
            arrs = self._arrays()
            words, tsc = arrs["blocks"], float(arrs["tscale"][0])
            nblocks = -(-(self.in_features * self.out_features) // 128)
            if words.shape != (nblocks * self.codec.words + 1,) or not math.isfinite(tsc):
                raise CodecError("compressed weight arrays do not match the layer's shape")
            st = (key, words, nblocks, self.codec.kernel_tables(), np.float64(tsc),
                  128 // math.gcd(self.in_features, 128))
            self._gemv_state = st
        _, words, nblocks, kt, tsc, unit = st
        y = np.empty((xf.shape[0], self.out_features), np.float32)
        bad = gemv_blocks(words, nblocks, kt, tsc, self.in_features, self.out_features, unit,
                          xf.numpy(), y)
        if bad:
            raise CodecError(f"{bad} corrupt blocks in a compressed weight "
                             f"({self.out_features} x {self.in_features})")
        return torch.from_numpy(y)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, codec={self.codec_config.get('id')}/"
                f"{self.codec_config.get('variant', self.codec_config.get('bits', ''))}, "
                f"bits_per_weight={self.bits_per_weight:.3f}")
