"""The self-contained byte form of a `Compressed` object (format version 1).

Layout (all integers little-endian):

    magic  b"ECKV"                      4 bytes
    format version (uint16)             2 bytes
    reserved, zero (uint16)             2 bytes
    header length H (uint32)            4 bytes
    header: UTF-8 JSON, H bytes         {codec, shape, dtype, axis, meta, arrays}
    array payloads, in header order     raw C-order bytes
    CRC-32 of everything above (uint32) 4 bytes

Every field is validated before use; any inconsistency raises `CodecError` (a ValueError)
naming what is wrong. The codec named in the header validates array sizes before a kernel
touches them, so corrupt bytes never cause an out-of-bounds read. The bytes are untrusted:
they never name a file to open, header size and shape are bounded, and parsing copies the
payload once (docs/untrusted.md).
"""

from __future__ import annotations

import json
import math
import struct
import threading
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np

from eccokv.codecs.base import DTYPE_BY_NAME, SUPPORTED_DTYPES, CodecError, Compressed

MAGIC = b"ECKV"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHHI")
_CRC = struct.Struct("<I")
_ALLOWED_ARRAY_DTYPES = {"uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32",
                         "int64", "float16", "float32", "float64"}
# Bounds on what a header may declare (a valid header is a few hundred bytes): they keep the
# parse of untrusted data small and bounded in time (JSON objects cost far more than bytes).
MAX_HEADER = 1 << 16
MAX_HEADER_CONTAINERS = 256
MAX_DIMS = 32
MAX_ARRAYS = 16


def _header(c: Compressed) -> bytes:
    doc = {
        "codec": c.codec_config,
        "shape": list(c.shape),
        "dtype": SUPPORTED_DTYPES[c.dtype],
        "axis": c.axis,
        "meta": c.meta,
        "arrays": [
            {"name": k, "dtype": str(a.dtype), "shape": list(a.shape)} for k, a in c.arrays.items()
        ],
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("utf-8")


def serialized_size(c: Compressed) -> int:
    """len(to_bytes(c)) without building the payload."""
    return _PREFIX.size + len(_header(c)) + c.payload_nbytes + _CRC.size


def to_bytes(c: Compressed) -> bytes:
    head = _header(c)
    parts = [_PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(head)), head]
    parts += [np.ascontiguousarray(a).tobytes() for a in c.arrays.values()]
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body) & 0xFFFFFFFF)


def from_bytes(b: bytes | bytearray | memoryview) -> Compressed:
    """Parse and fully validate bytes from `to_bytes`; raises CodecError on any problem.

    The data is untrusted: nothing in it is used as a path (a codec is built only from its
    JSON config, and an Ecco profile only from tables named by hash), embedded tables are
    validated before they are registered, and parsing allocates at most one copy of the
    payload (each array copied once into its own aligned, owned numpy array; the input is
    only viewed, never copied whole). See docs/untrusted.md.
    """
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(b).__name__}")
    mv = memoryview(b)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    n = mv.nbytes
    if n < _PREFIX.size + _CRC.size:
        raise CodecError(f"data is too short to be eccokv compressed data ({n} bytes)")
    magic, version, reserved, hlen = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CodecError(f"not eccokv compressed data (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise CodecError(
            f"format version mismatch: data is version {version}, this eccokv reads "
            f"version {FORMAT_VERSION}"
        )
    (crc,) = _CRC.unpack_from(mv, n - _CRC.size)
    if zlib.crc32(mv[: n - _CRC.size]) & 0xFFFFFFFF != crc:
        raise CodecError("checksum mismatch: the compressed data is corrupt or truncated")
    if reserved != 0:
        raise CodecError(f"reserved header field is {reserved}, expected 0")
    if hlen > MAX_HEADER or _PREFIX.size + hlen > n - _CRC.size:
        raise CodecError(f"header length {hlen} exceeds the data ({n} bytes): truncated")
    head = bytes(mv[_PREFIX.size : _PREFIX.size + hlen])
    nest = head.count(b"[") + head.count(b"{")
    if nest > MAX_HEADER_CONTAINERS:
        raise CodecError(f"header has {nest} JSON lists/objects, at most "
                         f"{MAX_HEADER_CONTAINERS} are allowed")
    try:
        doc = json.loads(head.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, too deep, huge int literal
        raise CodecError(f"header is not valid JSON: {e}") from None
    c = _parse_doc(doc, mv, _PREFIX.size + hlen, n - _CRC.size)
    if not isinstance(b, bytes) and not mv.readonly:
        # a mutable buffer could change after the checksum: check the bytes actually copied
        acc = zlib.crc32(mv[: _PREFIX.size])
        acc = zlib.crc32(head, acc)
        for a in c.arrays.values():
            acc = zlib.crc32(memoryview(a).cast("B"), acc) if a.nbytes else acc
        if acc & 0xFFFFFFFF != crc:
            raise CodecError("checksum mismatch: the buffer changed while it was parsed")
    from eccokv.codecs import families

    fam = families().get(c.codec_config["id"])
    if fam is not None:
        try:
            fam.prepare(c)
        except CodecError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise CodecError(f"invalid data for codec {c.codec_config['id']!r}: {e}") from None
    codec = codec_for(c.codec_config)
    codec.check_compatible(c)
    codec.validate(c)
    return c


# Codecs built from configs read from data, by canonical config JSON (bounded LRU): building
# an Ecco codec derives its encoder tables, which would otherwise dominate parsing small blobs.
MAX_CODECS = 64
_CODECS: OrderedDict[str, Any] = OrderedDict()
_CODECS_LOCK = threading.Lock()


def codec_for(config: dict[str, Any]) -> Any:
    """The codec a config read from data names (cached, LRU of MAX_CODECS); CodecError if
    the config cannot build one. The returned codec must not be mutated by callers."""
    from eccokv.codecs import get

    try:
        key = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CodecError(f"codec config in the data is not plain JSON: {e}") from None
    with _CODECS_LOCK:
        codec = _CODECS.get(key)
        if codec is not None:
            _CODECS.move_to_end(key)
            return codec
    try:
        codec = get(config)
    except CodecError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"cannot build the codec named in the data: {e}") from None
    with _CODECS_LOCK:
        _CODECS[key] = codec
        while len(_CODECS) > MAX_CODECS:
            _CODECS.popitem(last=False)
    return codec


def _parse_doc(doc: Any, b: memoryview, start: int, end: int) -> Compressed:
    if not isinstance(doc, dict):
        raise CodecError("header is not a JSON object")
    for key in ("codec", "shape", "dtype", "axis", "meta", "arrays"):
        if key not in doc:
            raise CodecError(f"header lacks the field {key!r}")
    codec, shape, dtype, axis, meta, arrays = (doc[k] for k in
                                               ("codec", "shape", "dtype", "axis", "meta",
                                                "arrays"))
    if not isinstance(codec, dict) or not isinstance(codec.get("id"), str):
        raise CodecError("header field 'codec' must be an object with a string 'id'")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise CodecError(f"invalid shape {shape!r}")
    if len(shape) > MAX_DIMS:
        raise CodecError(f"shape has {len(shape)} dims, at most {MAX_DIMS} are allowed")
    if not isinstance(dtype, str) or dtype not in DTYPE_BY_NAME:
        raise CodecError(f"unsupported dtype {dtype!r}")
    if not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis < max(len(shape), 1):
        raise CodecError(f"invalid axis {axis!r} for shape {shape}")
    if not isinstance(meta, dict):
        raise CodecError("header field 'meta' must be an object")
    if not isinstance(arrays, list):
        raise CodecError("header field 'arrays' must be a list")
    if len(arrays) > MAX_ARRAYS:
        raise CodecError(f"header lists {len(arrays)} arrays, at most {MAX_ARRAYS} are allowed")
    specs: list[tuple[str, str, list[int], int]] = []
    pos = start
    for spec in arrays:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise CodecError("array spec must be an object with a string 'name'")
        name, adt, ashape = spec["name"], spec.get("dtype"), spec.get("shape")
        if not isinstance(adt, str) or adt not in _ALLOWED_ARRAY_DTYPES:
            raise CodecError(f"array {name!r} has unsupported dtype {adt!r}")
        if not isinstance(ashape, list) or not all(_is_count(s) for s in ashape):
            raise CodecError(f"array {name!r} has invalid shape {ashape!r}")
        if len(ashape) > MAX_DIMS:
            raise CodecError(f"array {name!r} has {len(ashape)} dims, at most {MAX_DIMS}")
        if any(name == s[0] for s in specs):
            raise CodecError(f"array {name!r} appears twice")
        nbytes = math.prod(ashape) * np.dtype(adt).itemsize
        if pos + nbytes > end:
            raise CodecError(
                f"array {name!r} needs {nbytes} bytes but only {end - pos} remain: truncated"
            )
        specs.append((name, adt, ashape, pos))
        pos += nbytes
    if pos != end:
        raise CodecError(f"{end - pos} unexpected trailing bytes after the arrays")
    # sizes are consistent with the data: now copy each array once (owned, aligned, writable,
    # as the kernels expect; the input buffer is never copied whole)
    out: dict[str, np.ndarray] = {}
    for name, adt, ashape, p in specs:
        out[name] = np.frombuffer(b, dtype=adt, count=math.prod(ashape), offset=p).reshape(
            ashape).copy()
    return Compressed(codec, tuple(shape), DTYPE_BY_NAME[dtype], axis, out, meta)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < (1 << 40)
