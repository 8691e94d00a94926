"""The codec contract shared by every codec: `Codec`, `Compressed` and the grouping layout.

A codec turns a float tensor into a `Compressed` object made of a few numpy arrays plus a
small JSON-able metadata dict, and back. Groups are formed from consecutive values along
one axis (`axis`), so the same codec can group keys per channel over tokens (KIVI) or per
token over channels. This module imports neither transformers nor numba.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

SUPPORTED_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
DTYPE_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in SUPPORTED_DTYPES.items()}


class CodecError(ValueError):
    """Compressed data that cannot be decoded (corrupt, truncated, foreign, mismatched)."""


@dataclass(frozen=True)
class Layout:
    """How a tensor of `shape` is cut into rows of `length` values along `axis`.

    Row m = p * suffix + s holds the values at flat indices p*length*suffix + t*suffix + s,
    t = 0..length-1 (p over the dims before `axis`, s over the dims after it). Each row is
    split into `ngroups` groups of `group_size`; the last one is zero-padded.
    """

    shape: tuple[int, ...]
    axis: int
    group_size: int

    @property
    def prefix(self) -> int:
        return math.prod(self.shape[: self.axis])

    @property
    def length(self) -> int:
        return self.shape[self.axis] if self.shape else 1

    @property
    def suffix(self) -> int:
        return math.prod(self.shape[self.axis + 1 :])

    @property
    def rows(self) -> int:
        return self.prefix * self.suffix

    @property
    def ngroups(self) -> int:
        return -(-self.length // self.group_size)

    @property
    def nblocks(self) -> int:
        return self.rows * self.ngroups

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def normalize_axis(axis: int, ndim: int) -> int:
    """Return `axis` as a non-negative index into a tensor with `ndim` dims, or raise."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    nd = max(ndim, 1)
    if not -nd <= axis < nd:
        raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dims")
    return int(axis) % nd


def check_input(x: Any, what: str = "x") -> torch.Tensor:
    """Validate an input tensor: float32/float16/bfloat16 and finite. Returns it on the CPU.

    NaN or Inf raise ValueError naming how many and the first offending indices.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(SUPPORTED_DTYPES.values())
        raise TypeError(f"{what} has dtype {x.dtype}; supported dtypes are {allowed}")
    if x.is_complex():
        raise TypeError(f"{what} is complex; only real floating tensors can be encoded")
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    # One reduction on the hot path (max propagates NaN; Inf stays Inf); the detailed
    # count and positions are computed only for input that is actually bad.
    if x.numel() and not bool(torch.isfinite(x.abs().amax())):
        bad = ~torch.isfinite(x)
        nbad = int(bad.sum())
        if nbad:
            idx = bad.nonzero()[:5].tolist()
            nnan = int(torch.isnan(x).sum())
            shown = ", ".join(str(tuple(i)) for i in idx)
            raise ValueError(
                f"{what} contains {nbad} non-finite values ({nnan} NaN, {nbad - nnan} Inf) "
                f"out of {x.numel()}; first at index {shown}"
            )
    return x


def to_rows(x: torch.Tensor, layout: Layout) -> np.ndarray:
    """Return float32 groups of shape (nblocks, group_size), zero-padded, block b = m*G + g."""
    g = layout.group_size
    xf = x.reshape(layout.prefix, layout.length, layout.suffix).to(torch.float32)
    rows = xf.permute(0, 2, 1).reshape(layout.rows, layout.length)
    pad = layout.ngroups * g - layout.length
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return np.ascontiguousarray(rows.reshape(layout.nblocks, g).numpy())


def from_rows(groups: np.ndarray | torch.Tensor, layout: Layout) -> torch.Tensor:
    """Inverse of `to_rows`: float32 tensor of `layout.shape` from (nblocks, group_size)."""
    t = torch.as_tensor(groups).reshape(layout.rows, layout.ngroups * layout.group_size)
    t = t[:, : layout.length].reshape(layout.prefix, layout.suffix, layout.length)
    return t.permute(0, 2, 1).reshape(layout.shape)


@dataclass
class Compressed:
    """One compressed tensor: codec config, original shape/dtype/axis, arrays and metadata.

    `arrays` hold every payload byte (numpy arrays); `meta` holds small JSON-able scalars
    (e.g. the per-tensor scale). `nbytes` is the size of `to_bytes()`, i.e. every byte.
    """

    codec_config: dict[str, Any]
    shape: tuple[int, ...]
    dtype: torch.dtype
    axis: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def payload_nbytes(self) -> int:
        """Bytes of the arrays alone (what an in-memory cache layer holds per tensor)."""
        return int(sum(a.nbytes for a in self.arrays.values()))

    @property
    def nbytes(self) -> int:
        """Every byte of the self-contained serialised form, metadata included."""
        from eccokv.codecs.serialize import serialized_size

        return serialized_size(self)

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)

    def to_bytes(self) -> bytes:
        """Versioned, checksummed, self-contained byte form (see docs/format.md)."""
        from eccokv.codecs.serialize import to_bytes

        return to_bytes(self)

    def __repr__(self) -> str:
        return (
            f"Compressed(codec={self.codec_config.get('id')!r}, shape={self.shape}, "
            f"dtype={self.dtype}, axis={self.axis}, nbytes={self.nbytes}, "
            f"bits_per_value={self.bits_per_value:.3f})"
        )


class Codec(ABC):
    """Base class: subclasses set `codec_id` and implement `_encode`, `_decode`, config.

    `encode` validates the input and normalises the axis; `decode` validates the
    compressed object (structure and sizes, before any kernel runs) and the `out` buffer.
    A codec is immutable once built (its config and tables never change), so deep copies
    of what holds it (e.g. `copy.deepcopy(cache)`, the usual way to reuse a prompt cache)
    share it.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> Codec:
        return self

    codec_id: ClassVar[str]
    # values per group along the encode axis (1: no grouping, e.g. per-tensor fp8). A cache
    # grouping over tokens compresses whole groups only, so this is its token granularity.
    group_size: int = 1
    # whether encode() takes `importance=` (per-position error weights along the axis)
    supports_importance: ClassVar[bool] = False

    def encode(self, x: torch.Tensor, axis: int = -1,
               importance: torch.Tensor | np.ndarray | None = None) -> Compressed:
        """Compress `x` (any shape; float32/float16/bfloat16) in groups along `axis`.

        `importance` (codecs with `supports_importance` only; shape (x.shape[axis],),
        finite, >= 0) weights the error of each position along the axis in the encoder's
        choices; it is passed to `_encode` normalised to mean 1 (None if all zero)."""
        x = check_input(x)
        ax = normalize_axis(axis, x.dim())
        shape = tuple(x.shape)
        if importance is None:
            return self._encode(x.contiguous(), shape, ax)
        if not self.supports_importance:
            raise TypeError(f"codec {self.codec_id!r} does not take importance weights")
        n = shape[ax] if shape else 1
        w = np.asarray(importance.detach().cpu().numpy() if isinstance(
            importance, torch.Tensor) else importance, dtype=np.float64)
        if w.shape != (n,):
            raise ValueError(f"importance has shape {w.shape}, expected ({n},): one weight "
                             f"per position along axis {ax}")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError("importance must be finite and >= 0")
        m = float(w.mean()) if n else 0.0
        return self._encode(x.contiguous(), shape, ax, importance=w / m if m > 0 else None)

    def decode(self, c: Compressed, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decompress `c` into a new tensor of its original dtype/shape, or into `out`."""
        if not isinstance(c, Compressed):
            raise TypeError(f"expected a Compressed object, got {type(c).__name__}")
        self.check_compatible(c)
        self.validate(c)
        if out is not None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
            if tuple(out.shape) != tuple(c.shape):
                raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(c.shape)}")
            if out.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"out has dtype {out.dtype}; supported: float32/float16/bfloat16")
            if out.device.type != "cpu":
                raise ValueError("out must be a CPU tensor")
        else:
            out = torch.empty(c.shape, dtype=c.dtype)
        if c.numel == 0:
            return out
        self._decode(c, out)
        return out

    def check_compatible(self, c: Compressed) -> None:
        """Raise CodecError unless `c` was written by a codec with this codec's config."""
        mine = self.get_config()
        if c.codec_config != mine:
            raise CodecError(
                f"compressed data was made by codec config {c.codec_config}, "
                f"which differs from this codec's config {mine}"
            )

    def validate(self, c: Compressed) -> None:
        """Check array names, dtypes and sizes against the shape. Subclasses extend."""
        if c.dtype not in SUPPORTED_DTYPES:
            raise CodecError(f"unsupported original dtype {c.dtype}")
        if any((not isinstance(s, int)) or s < 0 for s in c.shape):
            raise CodecError(f"invalid shape {c.shape}")
        if not 0 <= c.axis < max(len(c.shape), 1):
            raise CodecError(f"axis {c.axis} out of range for shape {c.shape}")
        expected = self.expected_arrays(c)
        if set(c.arrays) != set(expected):
            raise CodecError(
                f"{self.codec_id}: expected arrays {sorted(expected)}, got {sorted(c.arrays)}"
            )
        for name, (dtype, shape) in expected.items():
            a = c.arrays[name]
            if not isinstance(a, np.ndarray) or a.dtype != np.dtype(dtype):
                raise CodecError(f"{self.codec_id}: array {name!r} must be {np.dtype(dtype)}")
            if tuple(a.shape) != tuple(shape):
                raise CodecError(
                    f"{self.codec_id}: array {name!r} has shape {a.shape}, expected {shape} "
                    f"for a tensor of shape {c.shape} (truncated or mismatched data)"
                )
            if not a.flags.c_contiguous:
                raise CodecError(f"{self.codec_id}: array {name!r} must be C-contiguous")

    @abstractmethod
    def expected_arrays(self, c: Compressed) -> dict[str, tuple[Any, tuple[int, ...]]]:
        """Name -> (numpy dtype, shape) of the arrays a valid `c` must hold."""

    @abstractmethod
    def _encode(self, x: torch.Tensor, shape: tuple[int, ...], axis: int) -> Compressed: ...

    @abstractmethod
    def _decode(self, c: Compressed, out: torch.Tensor) -> None: ...

    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """JSON-able dict with an "id" key that fully describes this codec."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        cfg = dict(config)
        cfg.pop("id", None)
        return cls(**cfg)

    @staticmethod
    def prepare(c: Compressed) -> None:
        """Hook run by `from_bytes` before the codec is built from the data's config
        (e.g. to register tables the data carries). Default: nothing."""
        return None

    def stats(self) -> dict[str, Any]:
        """Counters gathered while encoding (e.g. how often a fallback mode fired)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.get_config()})"


def make_compressed(
    codec: Codec,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    axis: int,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any] | None = None,
) -> Compressed:
    """Build a Compressed with C-contiguous arrays and the codec's current config."""
    arrs = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    return Compressed(codec.get_config(), tuple(int(s) for s in shape), dtype, axis, arrs,
                      dict(meta or {}))


# output dtype -> the `kind` code of the block decoders (float32 values, or the uint16 bits
# of bfloat16 / float16)
OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def decode_blocks_into(out: torch.Tensor, nblocks: int, run: Callable[..., Any],
                       what: str) -> None:
    """Run a block decoder `run(flat, kind, bad)` into `out` (any shape, float32 / bf16 /
    fp16; a non-contiguous `out` gets a contiguous buffer that is copied in at the end).

    `flat`: the output as a flat numpy array (float32, or uint16 bits for 16-bit types),
    `bad` (nblocks,) uint8 that the decoder sets to 1 for each corrupt block. Any corrupt
    block raises CodecError "<n> of <nblocks> <what> (first bad block <b>)", with `what`
    naming the blocks and the fault; `out` is then left partly written (callers decode
    into fresh buffers).
    """
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype)
    kind = OUT_KIND[target.dtype]
    flat = target.view(-1)
    arr = flat.numpy() if kind == 0 else flat.view(torch.uint16).numpy()
    bad = np.zeros(nblocks, dtype=np.uint8)
    run(arr, kind, bad)
    nbad = int(bad.sum())
    if nbad:
        first = int(np.flatnonzero(bad)[0])
        raise CodecError(f"{nbad} of {nblocks} {what} (first bad block {first})")
    if target is not out:
        out.copy_(target)
