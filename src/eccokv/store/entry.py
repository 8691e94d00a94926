"""One prefix-store entry: a fixed-size chunk of compressed tokens for every layer.

    decode_entry(data, key=None, expect=None, decode_check=True) -> Entry
    encode_entry(header, ids, layers, sinks) -> bytes

Entry j of a prompt covers compressed tokens [s + j*C, s + (j+1)*C) (s: exact sink
tokens, C: chunk tokens); entry 0 also carries the exact sink. Format: a
`eccokv.store.container` (magic b"ECKS", version 1) whose header holds the entry's own key
(hex), its parent's key, its index j, the model fingerprint, the settings hash (codec
configs and axes, sink, exact dtype, C, K/V dtype), the K/V dtype, and per layer the token
count of each piece; sections: "ids" (the chunk's token ids, int64; entry 0: the sink's
too), "l{i}.k{p}" / "l{i}.v{p}" (each piece: `Compressed.to_bytes()`, a slice of one of
the stored cache's chunks), and for entry 0 "l{i}.ks" / "l{i}.vs" (the sink, raw).

`decode_entry` raises `EntryError` (a ValueError) for anything wrong: corrupt or
truncated bytes (every section is CRC-checked, every chunk parsed by `from_bytes`), another
format version, an entry stored under another key (spliced), another model or settings,
other token ids, shapes that do not fit, and (decode_check) blocks that fail to decode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from eccokv.codecs.base import DTYPE_BY_NAME, CodecError, Compressed
from eccokv.store.container import ContainerError, need, pack, unpack

MAGIC = b"ECKS"
VERSION = 1
MAX_ENTRY_BYTES = 1 << 30


class EntryError(ValueError):
    """A store entry that must not be used (the reason is the message)."""


@dataclass
class Expect:
    """What a valid entry for one lookup must say (built by `eccokv.store.prefix`)."""

    fingerprint: str
    settings_hash: str
    index: int
    parent: str
    ids: list[int]
    codecs: list[tuple[Any, Any]]  # per layer: (key codec, value codec)
    kv_heads: int
    head_dim: int
    dtype: str
    exact_dtype: str
    sink: int
    chunk_tokens: int


@dataclass
class Entry:
    header: dict[str, Any]
    ids: list[int]
    pieces: list[tuple[list[Compressed], list[Compressed]]]  # per layer: K pieces, V pieces
    sinks: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # entry 0 only
    nbytes: int = 0
    tokens: list[tuple[list[int], list[int]]] = field(default_factory=list)


def encode_entry(header: dict[str, Any], ids: list[int],
                 layers: list[tuple[list[Compressed], list[Compressed]]],
                 sinks: list[tuple[torch.Tensor, torch.Tensor]] | None) -> bytes:
    """Bytes of one entry (header: key, parent, index, fingerprint, settings_hash, dtype,
    exact_dtype, sink, chunk_tokens; `layers`: per layer the K and V pieces)."""
    from eccokv.hf.persist import tensor_bytes

    secs: list[tuple[str, bytes]] = [("ids", torch.tensor(ids, dtype=torch.int64).numpy()
                                      .tobytes())]
    lay = []
    for i, (kp, vp) in enumerate(layers):
        rec = {}
        for name, pieces in (("k", kp), ("v", vp)):
            rec[name] = [_tokens(c) for c in pieces]
            secs += [(f"l{i}.{name}{p}", c.to_bytes()) for p, c in enumerate(pieces)]
        lay.append(rec)
        if sinks is not None:
            secs += [(f"l{i}.ks", tensor_bytes(sinks[i][0])),
                     (f"l{i}.vs", tensor_bytes(sinks[i][1]))]
    doc = dict(header, layers=lay, n_ids=len(ids), has_sink=sinks is not None)
    return pack(MAGIC, VERSION, doc, secs)


def _tokens(c: Compressed, head_dim: int | None = None) -> int:
    if len(c.shape) == 3:
        return c.shape[1]
    return c.shape[1] // head_dim if head_dim else c.shape[1]


def decode_entry(data: bytes | bytearray | memoryview, key: str | None = None,
                 expect: Expect | None = None, decode_check: bool = True) -> Entry:
    """Parse and validate one entry; without `expect` only its own consistency is checked
    (what `eccokv store verify` does). Raises EntryError naming the problem (TypeError
    if `data` is not bytes-like)."""
    try:
        return _decode_entry(data, key, expect, decode_check)
    except (EntryError, TypeError):
        raise
    except (KeyError, ValueError, IndexError, AttributeError, OverflowError,
            RuntimeError) as e:  # anything the checks above did not name
        raise EntryError(f"malformed store entry: {type(e).__name__}: {e}") from None


def _decode_entry(data: bytes | bytearray | memoryview, key: str | None,
                  expect: Expect | None, decode_check: bool) -> Entry:
    from eccokv.codecs.serialize import from_bytes
    from eccokv.hf.persist import CacheFileError, tensor_from

    if isinstance(data, (bytes, bytearray, memoryview)) and len(data) > MAX_ENTRY_BYTES:
        raise EntryError(f"entry of {len(data)} bytes exceeds {MAX_ENTRY_BYTES}")
    try:
        doc, secs = unpack(data, MAGIC, VERSION, "store entry")
        for f, t in (("key", str), ("parent", str), ("index", int), ("fingerprint", str),
                     ("settings_hash", str), ("dtype", str), ("exact_dtype", str),
                     ("sink", int), ("chunk_tokens", int), ("layers", list), ("n_ids", int),
                     ("has_sink", bool)):
            need(doc, f, t, "store entry")
    except (ContainerError, TypeError) as e:
        raise EntryError(str(e)) from None
    if key is not None and doc["key"] != key:
        raise EntryError(f"entry was written for key {doc['key'][:16]}..., read under "
                         f"{key[:16]}... (spliced or misplaced)")
    if expect is not None:
        for f, want in (("fingerprint", expect.fingerprint), ("settings_hash",
                                                              expect.settings_hash),
                        ("index", expect.index), ("parent", expect.parent),
                        ("dtype", expect.dtype), ("exact_dtype", expect.exact_dtype),
                        ("sink", expect.sink), ("chunk_tokens", expect.chunk_tokens)):
            if doc[f] != want:
                raise EntryError(f"entry {f} is {str(doc[f])[:40]}, expected {str(want)[:40]}")
        if len(doc["layers"]) != len(expect.codecs):
            raise EntryError(f"entry has {len(doc['layers'])} layers, the model "
                             f"{len(expect.codecs)}")
    if doc["dtype"] not in DTYPE_BY_NAME or doc["exact_dtype"] not in DTYPE_BY_NAME:
        raise EntryError("entry names an unsupported dtype")
    ids_buf = secs.get("ids")
    if ids_buf is None or len(ids_buf) != 8 * doc["n_ids"]:
        raise EntryError("entry token ids are missing or truncated")
    ids = torch.frombuffer(bytearray(ids_buf), dtype=torch.int64).tolist() if len(ids_buf) \
        else []
    if expect is not None and ids != expect.ids:
        raise EntryError("entry token ids differ from the prompt's (hash collision or "
                         "foreign entry)")
    C = doc["chunk_tokens"]
    built: dict[str, Any] = {}  # codecs by config (verify: no expected codecs given)
    pieces: list[tuple[list[Compressed], list[Compressed]]] = []
    sinks: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if doc["has_sink"] else None
    if expect is not None and (doc["has_sink"] != (expect.index == 0 and expect.sink > 0)):
        raise EntryError("entry sink presence does not match its index")
    for i, rec in enumerate(doc["layers"]):
        if not isinstance(rec, dict):
            raise EntryError(f"layer {i}: record is not an object")
        got = []
        for name in ("k", "v"):
            toks = rec.get(name)
            if not isinstance(toks, list) or not toks or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in toks):
                raise EntryError(f"layer {i} {name}: bad piece table {str(toks)[:60]}")
            if sum(toks) != C:
                raise EntryError(f"layer {i} {name}: pieces hold {sum(toks)} tokens, not {C}")
            cs = []
            for p, t in enumerate(toks):
                buf = secs.get(f"l{i}.{name}{p}")
                if buf is None:
                    raise EntryError(f"layer {i} {name}: piece {p} is missing")
                try:
                    c = from_bytes(buf)
                except (CodecError, ValueError, TypeError) as e:
                    raise EntryError(f"layer {i} {name} piece {p}: {e}") from None
                if expect is not None:
                    codec = expect.codecs[i][0 if name == "k" else 1]
                    H, D = expect.kv_heads, expect.head_dim
                    ok = (len(c.shape) == 3 and c.shape == (H, t, D)) or (
                        len(c.shape) == 2 and c.shape == (H, t * D))
                    if not ok:
                        raise EntryError(f"layer {i} {name} piece {p}: shape {c.shape} does not "
                                         f"fit {t} tokens of {H} KV heads x head_dim {D}")
                    if c.dtype != DTYPE_BY_NAME[doc["exact_dtype"]]:
                        raise EntryError(f"layer {i} {name} piece {p}: dtype {c.dtype}")
                    try:
                        codec.check_compatible(c)
                        codec.validate(c)
                        if decode_check:
                            codec.decode(c)
                    except CodecError as e:
                        raise EntryError(f"layer {i} {name} piece {p}: {e}") from None
                elif decode_check:
                    try:
                        ck = json.dumps(c.codec_config, sort_keys=True)
                        if ck not in built:
                            from eccokv.codecs import get

                            built[ck] = get(c.codec_config)
                        built[ck].decode(c)
                    except (CodecError, KeyError, ValueError, TypeError) as e:
                        raise EntryError(f"layer {i} {name} piece {p}: {e}") from None
                cs.append(c)
            got.append(cs)
        pieces.append((got[0], got[1]))
        if sinks is not None:
            s = doc["sink"]
            H = expect.kv_heads if expect is not None else -1
            D = expect.head_dim if expect is not None else -1
            pair = []
            for name in ("ks", "vs"):
                buf = secs.get(f"l{i}.{name}")
                if buf is None:
                    raise EntryError(f"layer {i}: sink {name} is missing")
                if H < 0:  # shape unknown without expect: infer from the first piece
                    c0 = got[0][0]
                    H = c0.shape[0]
                    D = c0.shape[2] if len(c0.shape) == 3 else max(1, len(buf) // max(
                        1, s * H * DTYPE_BY_NAME[doc["exact_dtype"]].itemsize))
                try:
                    t = tensor_from(buf, doc["exact_dtype"], [1, H, s, D], f"layer {i} sink")
                except CacheFileError as e:
                    raise EntryError(str(e)) from None
                if not bool(torch.isfinite(t).all()):
                    raise EntryError(f"layer {i}: sink holds NaN/Inf")
                pair.append(t)
            sinks.append((pair[0], pair[1]))
    return Entry(doc, ids, pieces, sinks, len(data))
