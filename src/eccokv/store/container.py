"""A small checksummed container: a JSON header and named binary sections.

Layout (integers little-endian):

    magic (4 bytes, one per use: b"ECKF" cache file, b"ECKS" store entry)
    format version (uint16), reserved zero (uint16)
    header length H (uint32)
    header: UTF-8 JSON object, H bytes; its "sections" lists [name, length, crc32]
    CRC-32 of everything above (uint32)
    the sections' bytes, back to back, in header order

`unpack` checks the magic, version, header CRC, every length against the data before any
allocation, and every section's CRC; any problem raises `ContainerError` (a ValueError)
naming it. Sections are returned as memoryviews into the data (no copy).
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

_PREFIX = struct.Struct("<4sHHI")
_CRC = struct.Struct("<I")
MAX_HEADER = 1 << 22  # 4 MiB of JSON at most
MAX_SECTIONS = 1 << 16


class ContainerError(ValueError):
    """Bytes that are not a valid container (corrupt, truncated, foreign, other version)."""


def pack(magic: bytes, version: int, header: dict[str, Any],
         sections: list[tuple[str, bytes | bytearray | memoryview]]) -> bytes:
    """Header dict (JSON-able, without "sections") + named sections -> bytes."""
    doc = dict(header)
    doc["sections"] = [[name, len(data), zlib.crc32(data) & 0xFFFFFFFF]
                       for name, data in sections]
    head = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("utf-8")
    pre = _PREFIX.pack(magic, version, 0, len(head)) + head
    return b"".join([pre, _CRC.pack(zlib.crc32(pre) & 0xFFFFFFFF)] + [bytes(d) if
                                                                      isinstance(d, memoryview)
                                                                      else d
                                                                      for _, d in sections])


def unpack(data: bytes | bytearray | memoryview, magic: bytes, version: int,
           what: str) -> tuple[dict[str, Any], dict[str, memoryview]]:
    """Parse and check `pack`'s bytes; returns (header, {section name: bytes})."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what}: expected bytes, got {type(data).__name__}")
    mv = memoryview(data).cast("B")
    n = len(mv)
    if n < _PREFIX.size + _CRC.size:
        raise ContainerError(f"{what}: {n} bytes is too short (truncated or empty)")
    got, ver, reserved, hlen = _PREFIX.unpack_from(mv, 0)
    if got != magic:
        raise ContainerError(f"{what}: not an eccokv {what} (magic {bytes(got)!r}, expected "
                             f"{magic!r})")
    if ver != version:
        raise ContainerError(f"{what}: format version {ver}, this eccokv reads version "
                             f"{version}")
    if reserved != 0:
        raise ContainerError(f"{what}: reserved field is {reserved}, expected 0")
    if hlen > MAX_HEADER or _PREFIX.size + hlen + _CRC.size > n:
        raise ContainerError(f"{what}: header length {hlen} exceeds the data ({n} bytes): "
                             "truncated")
    end = _PREFIX.size + hlen
    (crc,) = _CRC.unpack_from(mv, end)
    if zlib.crc32(mv[:end]) & 0xFFFFFFFF != crc:
        raise ContainerError(f"{what}: header checksum mismatch (corrupt)")
    try:
        doc = json.loads(bytes(mv[_PREFIX.size:end]).decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ContainerError(f"{what}: header is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ContainerError(f"{what}: header is not a JSON object")
    secs = doc.get("sections")
    if not isinstance(secs, list) or len(secs) > MAX_SECTIONS:
        raise ContainerError(f"{what}: header field 'sections' must be a list")
    pos = end + _CRC.size
    out: dict[str, memoryview] = {}
    for s in secs:
        if (not isinstance(s, list) or len(s) != 3 or not isinstance(s[0], str)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                           for v in s[1:])):
            raise ContainerError(f"{what}: bad section entry {str(s)[:80]}")
        name, ln, scrc = s
        if name in out:
            raise ContainerError(f"{what}: section {name!r} appears twice")
        if pos + ln > n:
            raise ContainerError(f"{what}: section {name!r} needs {ln} bytes, {n - pos} "
                                 "remain: truncated")
        part = mv[pos:pos + ln]
        if zlib.crc32(part) & 0xFFFFFFFF != scrc:
            raise ContainerError(f"{what}: section {name!r} checksum mismatch (corrupt)")
        out[name] = part
        pos += ln
    if pos != n:
        raise ContainerError(f"{what}: {n - pos} unexpected trailing bytes")
    return doc, out


def need(doc: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    """doc[key], checked to be of `typ` (bool is never an int here)."""
    v = doc.get(key)
    if not isinstance(v, typ) or (isinstance(v, bool) and typ in (int, (int,))):
        raise ContainerError(f"{what}: header field {key!r} is missing or not "
                             f"{getattr(typ, '__name__', typ)}: {str(v)[:80]}")
    return v
