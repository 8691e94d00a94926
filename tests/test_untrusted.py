"""Compressed bytes are untrusted (they come from other processes and machines).

- `from_bytes` never opens a path written in the data (an Ecco profile is named by hash);
- embedded Ecco tables are checked before they are registered, in a bounded registry;
- parsing a blob allocates about one copy of its payload (peak <= ~2x the blob).
"""

from __future__ import annotations

import json
import struct
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
import torch

import eccokv.codecs as C
from eccokv.codecs import ecco_profile
from eccokv.codecs.base import CodecError
from eccokv.codecs.ecco import EccoCodec
from eccokv.codecs.ecco_profile import Profile, VariantTables, default_profile
from eccokv.codecs.serialize import MAX_HEADER

PREFIX = struct.Struct("<4sHHI")


def split(b: bytes) -> tuple[dict, bytes]:
    _, _, _, hlen = PREFIX.unpack_from(b, 0)
    return json.loads(b[PREFIX.size : PREFIX.size + hlen]), b[PREFIX.size + hlen : -4]


def build(doc: dict, payload: bytes) -> bytes:
    head = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    body = PREFIX.pack(b"ECKV", 1, 0, len(head)) + head + payload
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def x(shape=(4, 300), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ no path in data is opened

_OPENED: list[str] = []
_WATCH: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if _WATCH and event in ("open", "os.listdir", "os.scandir"):
        p = str(args[0]) if args else ""
        if any(w in p for w in _WATCH):
            _OPENED.append(f"{event}:{p}")


sys.addaudithook(_audit)


@pytest.fixture
def watch_opens(monkeypatch):
    """Record every open of a watched path: Python-level opens (audit hook) and the
    safetensors reader (which opens files in Rust, invisible to the audit hook)."""
    import safetensors

    real = safetensors.safe_open

    def watched_safe_open(path, *a, **k):
        if any(w in str(path) for w in _WATCH):
            _OPENED.append(f"safe_open:{path}")
            raise AssertionError(f"safetensors.safe_open({path!r}) called while parsing data")
        return real(path, *a, **k)

    default_profile()  # the shipped profile is package data, loaded before the watch
    monkeypatch.setattr(safetensors, "safe_open", watched_safe_open)
    _OPENED.clear()
    yield _WATCH
    _WATCH.clear()
    _OPENED.clear()


def _custom_profile(variant: str = "ecco4", bump: float = 1e-3) -> Profile:
    """The default tables with one middle level moved: a different, valid profile."""
    d = default_profile().variants[variant]
    lv = d.levels.copy()
    lv[0, lv.shape[1] // 2] += np.float32(bump)
    lv[0] = np.sort(lv[0])
    return Profile({variant: VariantTables(lv, d.lengths.copy())}, {"test": "custom"})


@pytest.mark.parametrize("exists", [True, False])
def test_from_bytes_never_opens_a_profile_path_in_the_data(tmp_path, watch_opens, exists):
    """A header naming a profile file by path and no hash: the old code opened the file
    (EccoCodec(profile=path)). Now it is refused without touching the path."""
    prof = _custom_profile()
    path = tmp_path / "evil.ecprof"
    if exists:
        prof.save(path)  # a valid profile: opening it would even have "worked"
    doc, payload = split(EccoCodec("ecco4", profile=prof).encode(x()).to_bytes())
    # drop the embedded tables and name the file instead
    doc["codec"]["profile"] = str(path)
    del doc["codec"]["profile_hash"]
    doc["arrays"] = [a for a in doc["arrays"] if not a["name"].startswith("profile_")]
    nblk = doc["arrays"][0]["shape"][0] * 8 + 4
    watch_opens.append(str(path))
    with pytest.raises(CodecError, match="profile_hash") as ei:
        C.from_bytes(build(doc, payload[:nblk]))
    assert str(path) in str(ei.value)
    assert _OPENED == []
    # a config (as a store or cache file would hold it) is refused the same way
    with pytest.raises(ValueError, match="never opens"):
        C.get(doc["codec"])
    assert _OPENED == []
    # user code may still pass the path to the constructor (after the watch: it opens it)
    if exists:
        _WATCH.clear()
        assert EccoCodec("ecco4", profile=str(path)).profile_hash == prof.tables("ecco4").hash


def test_path_with_hash_resolves_by_hash_only(tmp_path, watch_opens):
    """Data made from a profile file records the path as a label and the hash: it decodes
    from the embedded tables without opening the file, which may not exist here."""
    prof = _custom_profile(bump=2e-3)
    path = tmp_path / "made-elsewhere.ecprof"
    prof.save(path)
    codec = EccoCodec("ecco4", profile=str(path))
    y = codec.decode(c := codec.encode(x()))
    b = c.to_bytes()
    assert split(b)[0]["codec"]["profile"] == str(path)
    path.unlink()
    watch_opens.append(str(path))
    got = C.from_bytes(b)
    assert _OPENED == []
    assert C.get(got.codec_config).get_config() == got.codec_config  # label round-trips
    assert torch.equal(C.get(got.codec_config).decode(got), y)
    assert _OPENED == []


def test_profile_must_be_a_label_string():
    doc, payload = split(C.get("ecco4").encode(x()).to_bytes())
    for bad in ([1, 2], {"a": 1}, 3):
        doc["codec"]["profile"] = bad
        with pytest.raises(CodecError, match="profile"):
            C.from_bytes(build(doc, payload))


# ------------------------------------------------------------------ embedded tables


def _forge_tables(b: bytes, levels: np.ndarray, lengths: np.ndarray) -> bytes:
    """Replace the embedded tables of an Ecco blob (hash and CRC made consistent)."""
    doc, payload = split(b)
    specs = {a["name"]: a for a in doc["arrays"]}
    parts, pos = {}, 0
    for a in doc["arrays"]:
        n = int(np.prod(a["shape"])) * np.dtype(a["dtype"]).itemsize
        parts[a["name"]] = payload[pos : pos + n]
        pos += n
    parts["profile_levels"] = np.ascontiguousarray(levels, np.float32).tobytes()
    parts["profile_lengths"] = np.ascontiguousarray(lengths, np.uint8).tobytes()
    specs["profile_levels"]["shape"] = list(levels.shape)
    specs["profile_lengths"]["shape"] = list(lengths.shape)
    try:
        doc["codec"]["profile_hash"] = VariantTables(
            np.ascontiguousarray(levels, np.float32), np.ascontiguousarray(lengths, np.uint8)
        ).hash
    except ValueError:  # invalid tables: hash them as the format does anyway
        import hashlib

        h = hashlib.sha256(b"eccokv-ecco-profile:1")
        for a in (np.ascontiguousarray(levels, np.float32),
                  np.ascontiguousarray(lengths, np.uint8)):
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        doc["codec"]["profile_hash"] = h.hexdigest()[:16]
    return build(doc, b"".join(parts[a["name"]] for a in doc["arrays"])), doc["codec"][
        "profile_hash"]


def _custom_blob() -> tuple[bytes, VariantTables]:
    prof = _custom_profile(bump=3e-3)
    return EccoCodec("ecco4", profile=prof).encode(x()).to_bytes(), prof.tables("ecco4")


@pytest.mark.parametrize("case", ["kraft_over", "kraft_under", "nan_level", "unsorted",
                                  "outside", "zero_length", "too_long", "bad_count"])
def test_invalid_embedded_tables_are_rejected_and_not_registered(case):
    b, t = _custom_blob()
    lv, ln = t.levels.copy(), t.lengths.copy()
    if case == "kraft_over":
        ln[0, 0] = max(1, int(ln[0, 0]) - 1)  # a shorter code: sum 2^-l > 1
    elif case == "kraft_under":
        ln[0, 0] = int(ln[0, 0]) + 1  # a longer code: incomplete (some peeks decode nothing)
    elif case == "nan_level":
        lv[1, 3] = np.nan
    elif case == "unsorted":
        lv[1, 2], lv[1, 3] = lv[1, 3], lv[1, 2] - 0.5
    elif case == "outside":
        lv[2, 1] = -3.0
    elif case == "zero_length":
        ln[1, 2] = 0
    elif case == "too_long":
        ln[1] = 9
    elif case == "bad_count":  # 3 codebooks: not a power of two
        ln = ln[:3]
    m, h = _forge_tables(b, lv, ln)
    before = ecco_profile.registered_tables()
    with pytest.raises(CodecError, match="profile"):
        C.from_bytes(m)
    assert ecco_profile.lookup_tables(h, missing_ok=True) is None
    assert ecco_profile.registered_tables() == before


def test_embedded_tables_must_match_the_hash_and_come_in_pairs():
    b, t = _custom_blob()
    doc, payload = split(b)
    doc["codec"]["profile_hash"] = default_profile().variants["ecco4"].hash
    with pytest.raises(CodecError, match="hash"):
        C.from_bytes(build(doc, payload))
    doc, payload = split(b)
    nlen = int(np.prod(t.lengths.shape))
    doc["arrays"] = [a for a in doc["arrays"] if a["name"] != "profile_lengths"]
    with pytest.raises(CodecError, match="both"):
        C.from_bytes(build(doc, payload[:-nlen]))


def test_embedded_table_registry_is_a_bounded_lru(monkeypatch):
    monkeypatch.setattr(ecco_profile, "MAX_EMBEDDED_TABLES", 8)
    b, t = _custom_blob()
    hashes = []
    for i in range(20):
        lv = t.levels.copy()
        lv[5, 6] = np.float32(lv[5, 6]) + np.float32((i + 1) * 1e-5)
        lv[5] = np.sort(lv[5])
        m, h = _forge_tables(b, lv, t.lengths)
        c = C.from_bytes(m)  # valid forged tables: parse, decode
        y = C.get(c.codec_config).decode(c)
        assert torch.isfinite(y).all()
        hashes.append(h)
        assert ecco_profile.registered_tables()["embedded"] <= 8
    assert ecco_profile.lookup_tables(hashes[0], missing_ok=True) is None  # evicted
    assert ecco_profile.lookup_tables(hashes[-1], missing_ok=True) is not None
    # tables user code loaded are never evicted
    assert ecco_profile.lookup_tables(default_profile().variants["ecco4"].hash) is not None
    assert ecco_profile.lookup_tables(t.hash) is not None


# ------------------------------------------------------------------ bounded parsing


def test_header_bounds():
    doc, payload = split(C.get("int4").encode(x()).to_bytes())
    big = dict(doc, meta={"sdtype": "float16", "pad": "x" * MAX_HEADER})
    with pytest.raises(CodecError, match="header length"):
        C.from_bytes(build(big, payload))
    nested = dict(doc, meta={"sdtype": "float16", "n": [[] for _ in range(300)]})
    with pytest.raises(CodecError, match="lists/objects"):
        C.from_bytes(build(nested, payload))
    deep = dict(doc, shape=[1] * 40 + doc["shape"])
    with pytest.raises(CodecError, match="dims"):
        C.from_bytes(build(deep, payload))


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
@pytest.mark.parametrize("name", ["none", "int4", "ecco4"])
def test_parse_peak_memory_is_one_payload_copy(name, kind):
    """Peak memory allocated while parsing <= the payload once + a small constant, so with
    the blob itself the process holds about 2x the blob (the old code copied a bytearray or
    memoryview whole, then sliced it for the CRC: 3x)."""
    shape = (64, 128 * 512) if name != "ecco4" else (16, 128 * 256)
    blob = C.get(name).encode(x(shape, seed=1)).to_bytes()
    data = {"bytes": blob, "bytearray": bytearray(blob), "memoryview": memoryview(blob)}[kind]
    C.from_bytes(data)  # warm (imports, codec cache)
    tracemalloc.start()
    try:
        c = C.from_bytes(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 1.02 * len(blob) + (1 << 20), (peak, len(blob))
    assert peak >= 0.9 * c.payload_nbytes  # the arrays themselves were traced
    for a in c.arrays.values():  # what kernels get: owned, aligned, writable, C order
        assert a.flags.owndata and a.flags.aligned and a.flags.writeable
        assert a.flags.c_contiguous and a.ctypes.data % a.dtype.itemsize == 0


def test_mutable_buffer_changed_after_checksum_is_caught(monkeypatch):
    """A bytearray is copied array by array after the checksum: the copies are checked
    against the CRC again, so a change in between cannot slip through."""
    from eccokv.codecs import serialize

    blob = bytearray(C.get("int4").encode(x()).to_bytes())
    real = serialize._parse_doc

    def racing(doc, mv, start, end):
        blob[end - 1] ^= 0x40  # another thread writes after the CRC was checked
        return real(doc, mv, start, end)

    monkeypatch.setattr(serialize, "_parse_doc", racing)
    with pytest.raises(CodecError, match="changed"):
        C.from_bytes(blob)
