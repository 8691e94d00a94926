"""An LMCache serde that stores KV chunks Ecco-compressed (LMCache 0.5.6 multiprocess mode).

Importing this module registers the serde type "eccokv" with LMCache
(`register_serde_factory`), so any LMCache L2 backend can hold eccokv bytes:

    --l2-adapter '{"type": "fs", "base_path": "/cache",
                   "serde": {"type": "eccokv", "codec": "ecco4"}}'

Options (the "serde" dict): codec (an eccokv preset, default "ecco4"), key_axis and
value_axis ("tokens": groups of consecutive tokens of one channel, eccokv's default, or
"channels"), max_workers (threads of LMCache's AsyncSerdeProcessor, default 1).

A KV chunk is LMCache's multiprocess layout, one tensor [2, layers, tokens, hidden]
(K then V). The stored bytes are a small frame (magic b"EKLC", version, JSON header with
the object key, the codec config and the shape, CRC-32) followed by one
`Compressed.to_bytes()` blob per (K/V, layer). `deserialize` checks the frame, that it was
written for this very key (model, chunk hash, rank, group, salt: a misplaced or spliced
object is refused), the codec config and shapes, and parses every blob with `from_bytes`
(untrusted-bytes rules, docs/untrusted.md) before it writes anything into the destination:
a bad object raises `LMCacheSerdeError`, which LMCache turns into a failed load (a miss),
never into wrong KV.

Pinned to lmcache==0.5.6, whose `Serializer.serialize(src, dst, key) -> int` and
`Deserializer.deserialize(src, dst, key)` take the key (other releases differ).
Installed without its CUDA dependencies (`make setup`; docs/untrusted.md).
"""

from __future__ import annotations

import json
import struct
import threading
import zlib
from typing import Any

import numpy as np
import torch

try:
    from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
    from lmcache.v1.distributed.serde import (
        AsyncSerdeProcessor,
        Deserializer,
        SerdeProcessor,
        Serializer,
        register_serde_factory,
    )
    from lmcache.v1.memory_management import MemoryObj
except ImportError as e:  # pragma: no cover - exercised only without lmcache
    raise ImportError(
        f"eccokv.store.lmcache needs lmcache 0.5.6 ({e}); install it with `make setup` "
        "(pip install --no-deps lmcache==0.5.6 plus the eccokv[lmcache] extra)"
    ) from None

import eccokv.codecs as C
from eccokv.codecs.base import Codec, CodecError, Compressed

SERDE_NAME = "eccokv"
MAGIC = b"EKLC"
VERSION = 1
_FRAME = struct.Struct("<4sHHI")  # magic, version, reserved, header length
_CRC = struct.Struct("<I")
_AXES = {"tokens": 0, "channels": 1}
MAX_FRAME_HEADER = 1 << 16
_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


class LMCacheSerdeError(ValueError):
    """A KV object that cannot be (de)serialized; the message says why."""


def _key_doc(key: ObjectKey | None) -> dict[str, Any] | None:
    if key is None:
        return None
    return {"model": key.model_name, "chunk": bytes(key.chunk_hash).hex(),
            "rank": int(key.kv_rank), "group": int(key.object_group_id),
            "salt": getattr(key, "cache_salt", "")}


def _kv_shape(shape: Any, what: str) -> tuple[int, int, int, int]:
    s = tuple(int(d) for d in shape)
    if len(s) != 4 or s[0] != 2:
        raise LMCacheSerdeError(f"{what}: expected LMCache's KV layout [2, layers, tokens, "
                                f"hidden], got {list(s)}")
    return s  # type: ignore[return-value]


def _one_group(layout_shapes: list[Any], dtypes: list[Any], what: str) -> tuple[Any, Any]:
    if len(layout_shapes) != 1 or len(dtypes) != 1:
        raise LMCacheSerdeError(f"{what}: one object group is supported, got "
                                f"{len(layout_shapes)}")
    if dtypes[0] not in _DTYPES:
        raise LMCacheSerdeError(f"{what}: KV dtype {dtypes[0]} is not float16/bfloat16/"
                                "float32")
    return _kv_shape(layout_shapes[0], what), dtypes[0]


class _Codecs:
    """The configured K and V codecs and axes, and the per-layout size bound."""

    def __init__(self, codec: Any = "ecco4", key_axis: str = "tokens",
                 value_axis: str = "tokens") -> None:
        for name, ax in (("key_axis", key_axis), ("value_axis", value_axis)):
            if ax not in _AXES:
                raise ValueError(f"eccokv serde: {name} must be 'tokens' or 'channels', got "
                                 f"{ax!r}")
        try:
            self.codec: Codec = C.get(codec)
        except KeyError as e:
            raise ValueError(f"eccokv serde: {e.args[0]}") from None
        self.axes = (_AXES[key_axis], _AXES[value_axis])
        self.config = self.codec.get_config()
        self._sizes: dict[tuple[Any, ...], int] = {}
        self._lock = threading.Lock()

    def bound(self, shape: tuple[int, int, int, int], dtype: torch.dtype) -> int:
        """Upper bound of the serialized bytes for one object of this layout: the frame
        for a worst-case key plus, per (K/V, layer), the largest blob the codec writes for
        a [tokens, hidden] tensor (probed once per layout with tiny and huge values: the
        int codec switches its scales to float32 for those; Ecco, fp8 and none are fixed
        size)."""
        k = (shape, dtype)
        with self._lock:
            if k in self._sizes:
                return self._sizes[k]
        _, L, T, D = shape
        per = []
        for axis in self.axes:
            n = 0
            big = min(1e5, 0.99 * torch.finfo(dtype).max)
            for scale in (0.0, 1.0, 1e-4, big):
                x = torch.full((T, D), scale, dtype=torch.float32)
                if scale:
                    x[0, 0] = -scale
                n = max(n, self.codec.encode(x.to(dtype), axis=axis).nbytes)
            per.append(n)
        key = {"model": "x" * 256, "chunk": "0" * 128, "rank": 2**31, "group": 2**31,
               "salt": "x" * 256}
        head = self._header(key, shape, dtype, [per[0]] * L + [per[1]] * L)
        total = _FRAME.size + len(head) + 256 + _CRC.size + L * (per[0] + per[1])
        with self._lock:
            self._sizes[k] = total
        return total

    def _header(self, key: dict[str, Any] | None, shape: tuple[int, ...], dtype: torch.dtype,
                lengths: list[int]) -> bytes:
        doc = {"key": key, "codec": self.config, "axes": list(self.axes),
               "shape": list(shape), "dtype": _DTYPES[dtype], "blobs": lengths}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class EccoSerializer(Serializer):
    """KV chunk -> eccokv bytes (see the module docstring)."""

    def __init__(self, codecs: _Codecs) -> None:
        self.c = codecs

    def estimate_serialized_size(self, layout_desc: MemoryLayoutDesc) -> int:
        shape, dtype = _one_group(list(layout_desc.shapes), list(layout_desc.dtypes),
                                  "eccokv serde")
        return self.c.bound(shape, dtype)

    def serialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey) -> int:
        x, out = src.tensor, dst.tensor
        if x is None or out is None:
            raise LMCacheSerdeError("eccokv serde: source or destination has no tensor")
        shape = _kv_shape(x.shape, "eccokv serde source")
        if x.dtype not in _DTYPES:
            raise LMCacheSerdeError(f"eccokv serde: KV dtype {x.dtype} is not supported")
        _, L, _, _ = shape
        blobs = [self.c.codec.encode(x[kv, layer], axis=self.c.axes[kv]).to_bytes()
                 for kv in (0, 1) for layer in range(L)]
        head = self.c._header(_key_doc(key), shape, x.dtype, [len(b) for b in blobs])
        pre = _FRAME.pack(MAGIC, VERSION, 0, len(head)) + head
        crc = zlib.crc32(pre)
        for b in blobs:
            crc = zlib.crc32(b, crc)
        data = b"".join([pre, *blobs, _CRC.pack(crc & 0xFFFFFFFF)])
        flat = out.reshape(-1).view(torch.uint8) if out.dtype != torch.uint8 else \
            out.reshape(-1)
        if len(data) > flat.numel():
            raise LMCacheSerdeError(f"eccokv serde: {len(data)} bytes do not fit the "
                                    f"{flat.numel()}-byte buffer (estimate too small)")
        flat[: len(data)].numpy()[:] = np.frombuffer(data, dtype=np.uint8)
        return len(data)


class EccoDeserializer(Deserializer):
    """eccokv bytes -> KV chunk; refuses anything not written for this key and layout."""

    def __init__(self, codecs: _Codecs) -> None:
        self.c = codecs

    def deserialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey) -> None:
        buf, out = src.tensor, dst.tensor
        if buf is None or out is None:
            raise LMCacheSerdeError("eccokv serde: source or destination has no tensor")
        raw = buf.reshape(-1).view(torch.uint8) if buf.dtype != torch.uint8 else buf.reshape(-1)
        kv = parse(memoryview(raw.numpy()), self.c, key, tuple(out.shape), out.dtype)
        out.copy_(kv)


def parse(data: memoryview | bytes, codecs: _Codecs, key: ObjectKey | None,
          shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Validate one stored object (its bytes may be followed by unused buffer space) and
    decode it to a [2, layers, tokens, hidden] tensor of `dtype`; LMCacheSerdeError if
    anything is wrong. Nothing is written anywhere until every blob has been checked."""
    mv = memoryview(data).cast("B")
    shape = _kv_shape(shape, "eccokv serde destination")
    if len(mv) < _FRAME.size + _CRC.size:
        raise LMCacheSerdeError(f"eccokv serde: {len(mv)} bytes is too short")
    magic, ver, res, hlen = _FRAME.unpack_from(mv, 0)
    if bytes(magic) != MAGIC:
        raise LMCacheSerdeError(f"eccokv serde: not an eccokv object (magic {bytes(magic)!r})")
    if ver != VERSION or res != 0:
        raise LMCacheSerdeError(f"eccokv serde: format version {ver}, this eccokv reads "
                                f"{VERSION}")
    if hlen > MAX_FRAME_HEADER or _FRAME.size + hlen + _CRC.size > len(mv):
        raise LMCacheSerdeError(f"eccokv serde: header length {hlen} exceeds the data")
    try:
        doc = json.loads(bytes(mv[_FRAME.size:_FRAME.size + hlen]).decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise LMCacheSerdeError(f"eccokv serde: header is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise LMCacheSerdeError("eccokv serde: header is not an object")
    lengths = doc.get("blobs")
    _, L, T, D = shape
    if (not isinstance(lengths, list) or len(lengths) != 2 * L
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                       for n in lengths)):
        raise LMCacheSerdeError(f"eccokv serde: blob table {str(lengths)[:60]} does not fit "
                                f"{L} layers")
    end = _FRAME.size + hlen + sum(lengths)
    if end + _CRC.size > len(mv):
        raise LMCacheSerdeError(f"eccokv serde: object needs {end + _CRC.size} bytes, "
                                f"{len(mv)} present: truncated")
    (crc,) = _CRC.unpack_from(mv, end)
    if zlib.crc32(mv[:end]) & 0xFFFFFFFF != crc:
        raise LMCacheSerdeError("eccokv serde: checksum mismatch (corrupt or truncated)")
    want = _key_doc(key)
    if want is not None and doc.get("key") != want:
        got = doc.get("key") or {}
        raise LMCacheSerdeError(
            f"eccokv serde: object was written for key {str(got)[:120]}, read under "
            f"{str(want)[:120]} (misplaced or spliced)")
    if doc.get("codec") != codecs.config or doc.get("axes") != list(codecs.axes):
        raise LMCacheSerdeError(f"eccokv serde: object was written by codec {doc.get('codec')}"
                                f" axes {doc.get('axes')}, this serde is {codecs.config} axes "
                                f"{list(codecs.axes)}")
    if doc.get("shape") != list(shape) or doc.get("dtype") != _DTYPES.get(dtype):
        raise LMCacheSerdeError(f"eccokv serde: object holds {doc.get('shape')} "
                                f"{doc.get('dtype')}, the destination is {list(shape)} "
                                f"{_DTYPES.get(dtype, dtype)}")
    pos = _FRAME.size + hlen
    chunks: list[Compressed] = []
    for i, n in enumerate(lengths):
        try:
            c = C.from_bytes(mv[pos:pos + n])
            codecs.codec.check_compatible(c)
        except CodecError as e:
            raise LMCacheSerdeError(f"eccokv serde: blob {i}: {e}") from None
        if c.shape != (T, D) or c.dtype != dtype or c.axis != codecs.axes[i // L]:
            raise LMCacheSerdeError(f"eccokv serde: blob {i} holds {c.shape} {c.dtype} axis "
                                    f"{c.axis}, expected {(T, D)} {dtype}")
        chunks.append(c)
        pos += n
    kv = torch.empty((2, L, T, D), dtype=dtype)
    try:
        for i, c in enumerate(chunks):
            codecs.codec.decode(c, out=kv[i // L, i % L])
    except CodecError as e:
        raise LMCacheSerdeError(f"eccokv serde: {e}") from None
    return kv


def make_serde(kwargs: dict[str, object]) -> SerdeProcessor:
    """LMCache serde factory: the "serde" dict of an --l2-adapter spec, minus "type"."""
    opts = dict(kwargs)
    workers = opts.pop("max_workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 64:
        raise ValueError(f"eccokv serde: max_workers must be an int in 1..64, got {workers!r}")
    unknown = set(opts) - {"codec", "key_axis", "value_axis"}
    if unknown:
        raise ValueError(f"eccokv serde: unknown options {sorted(unknown)}; known: codec, "
                         "key_axis, value_axis, max_workers")
    codecs = _Codecs(**opts)  # type: ignore[arg-type]
    return AsyncSerdeProcessor(EccoSerializer(codecs), EccoDeserializer(codecs),
                               max_workers=workers)


def _register() -> None:
    from lmcache.v1.distributed.serde import get_registered_serde_types

    if SERDE_NAME not in get_registered_serde_types():
        register_serde_factory(SERDE_NAME, make_serde)


_register()
