"""The byte format refuses anything that is not intact eccokv data, for every codec.

Every failure must be a ValueError subclass (CodecError) with a message; nothing may crash,
hang or raise anything else. Mutations with a recomputed CRC get past the checksum so the
structural validation (header fields, array sizes, codec checks) is what is exercised.
"""

from __future__ import annotations

import functools
import json
import random
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eccokv.codecs as C
from eccokv.codecs.base import CodecError
from eccokv.codecs.serialize import FORMAT_VERSION, MAGIC

CODECS = C.available()
PREFIX = struct.Struct("<4sHHI")
FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------- helpers


@functools.cache
def blob(name: str, shape: tuple[int, ...] = (2, 3, 130), axis: int = -1) -> bytes:
    dt = DTYPES[sum(map(ord, name)) % 3]
    g = torch.Generator().manual_seed(len(name) + sum(shape))
    x = torch.randn(shape, generator=g).to(dt)
    return C.get(name).encode(x, axis=axis).to_bytes()


def split(b: bytes) -> tuple[dict, bytes]:
    """(header doc, array payload) of a valid blob."""
    _, _, _, hlen = PREFIX.unpack_from(b, 0)
    doc = json.loads(b[PREFIX.size : PREFIX.size + hlen])
    return doc, b[PREFIX.size + hlen : -4]


def with_crc(body: bytes) -> bytes:
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)) & 0xFFFFFFFF)


def recrc(b: bytes | bytearray) -> bytes:
    """Replace the trailing CRC with a valid one for the bytes before it."""
    return with_crc(bytes(b[:-4]))


def build(doc, payload: bytes, version: int = FORMAT_VERSION, reserved: int = 0,
          hlen: int | None = None, magic: bytes = MAGIC) -> bytes:
    head = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    n = len(head) if hlen is None else hlen
    return with_crc(PREFIX.pack(magic, version, reserved, n) + head + payload)


def rejects(b, match: str | None = None) -> CodecError:
    with pytest.raises(ValueError) as ei:
        C.from_bytes(b)
    e = ei.value
    assert isinstance(e, CodecError), f"{type(e).__name__} is not a CodecError: {e}"
    assert len(str(e)) > 10
    if match is not None:
        assert match.lower() in str(e).lower(), str(e)
    return e


def outcome(b) -> str:
    """Parse and decode: 'error' on a ValueError, 'ok' on a well-formed decode. Any other
    exception propagates and fails the calling test."""
    try:
        c = C.from_bytes(b)
        y = C.get(c.codec_config).decode(c)
    except ValueError as e:
        assert str(e)
        return "error"
    assert isinstance(y, torch.Tensor)
    assert tuple(y.shape) == tuple(c.shape) and y.dtype == c.dtype
    return "ok"


# ---------------------------------------------------------------- sanity


@pytest.mark.parametrize("name", CODECS)
def test_valid_blob_decodes(name):
    b = blob(name)
    assert outcome(b) == "ok"
    assert C.from_bytes(b).to_bytes() == b
    assert outcome(with_crc(b[:-4])) == "ok"  # the helper rebuilds the same CRC
    doc, payload = split(b)
    assert outcome(build(doc, payload)) == "ok"  # and the same header


# ---------------------------------------------------------------- truncation and flips


@pytest.mark.parametrize("name", CODECS)
def test_every_prefix_of_a_small_blob_is_rejected(name):
    b = blob(name, (2, 5), -1)
    for n in range(len(b)):
        e = rejects(b[:n])
        assert any(w in str(e) for w in ("short", "checksum", "truncated", "magic")), str(e)


@pytest.mark.parametrize("name", CODECS)
def test_random_cuts_of_a_bigger_blob_are_rejected(name):
    b = blob(name, (8, 1000), 0)
    rng = random.Random(name)
    for n in [rng.randrange(len(b)) for _ in range(40)] + [len(b) - 1, len(b) - 4, 12]:
        rejects(b[:n])
        rejects(b[n:] if n else b[1:])
    rejects(b + b"\0")
    rejects(b + b)


@pytest.mark.parametrize("name", CODECS)
def test_single_bit_flips_are_always_detected(name):
    b = blob(name)
    rng = random.Random(name + "flip")
    positions = [rng.randrange(len(b) * 8) for _ in range(200)]
    positions += list(range(0, 16 * 8)) + [len(b) * 8 - 1]  # the whole fixed prefix
    for p in positions:
        m = bytearray(b)
        m[p // 8] ^= 1 << (p % 8)
        rejects(bytes(m))


def test_foreign_bytes_are_rejected():
    rng = random.Random(0)
    png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(40)
    cases = [b"", b"E", b"ECKV", b"ECKV" + bytes(12), png, b'{"codec": {"id": "none"}}',
             json.dumps({"a": list(range(100))}).encode(), b"\x1f\x8b\x08\0" + bytes(60),
             b"PK\x03\x04" + bytes(60), bytes(1000), b"\xff" * 1000]
    cases += [rng.randbytes(rng.randrange(1, 3000)) for _ in range(50)]
    cases += [MAGIC + rng.randbytes(rng.randrange(0, 300)) for _ in range(50)]
    for b in cases:
        rejects(b)
        rejects(bytearray(b))
        rejects(memoryview(b))
    with pytest.raises(TypeError):
        C.from_bytes("ECKV")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        C.from_bytes(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- prefix fields


@pytest.mark.parametrize("name", CODECS)
def test_wrong_magic(name):
    b = blob(name)
    for magic in (b"ECKW", b"eckv", b"\0\0\0\0", b"PNG\x89"):
        rejects(recrc(magic + b[4:]), "magic")


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, 7, 65535])
def test_other_format_versions_name_the_version(name, version):
    b = bytearray(blob(name))
    struct.pack_into("<H", b, 4, version)
    e = rejects(recrc(b), "version")
    assert str(version) in str(e) and str(FORMAT_VERSION) in str(e)


@pytest.mark.parametrize("name", CODECS)
def test_reserved_field_and_header_length(name):
    b = blob(name)
    doc, payload = split(b)
    rejects(build(doc, payload, reserved=1), "reserved")
    head_len = len(json.dumps(doc).encode())
    for hlen in (0, 1, head_len - 1, head_len + 1, len(b), 2**31, 2**32 - 1):
        rejects(build(doc, payload, hlen=hlen))


# ---------------------------------------------------------------- header content


@pytest.mark.parametrize("name", CODECS)
def test_header_claiming_huge_arrays(name):
    doc, payload = split(blob(name))
    for size in (2**20, 2**32, 2**39, 2**40 - 1):
        d = json.loads(json.dumps(doc))
        d["arrays"][0]["shape"] = [size]
        rejects(build(d, payload))
        d["arrays"][0]["shape"] = [size, size, size]
        rejects(build(d, payload))
    d = json.loads(json.dumps(doc))
    d["arrays"][0]["shape"] = [2**40]
    rejects(build(d, payload), "invalid shape")
    # a huge tensor shape with the small arrays: the codec's own size check fires
    for shape in ([2**39], [2**39, 2**39], [1 << 20] * 4):
        d = json.loads(json.dumps(doc))
        d["shape"] = shape
        d["axis"] = 0
        rejects(build(d, payload))


@pytest.mark.parametrize("name", CODECS)
def test_unknown_or_invalid_codec_in_header(name):
    doc, payload = split(blob(name))
    for codec in ({"id": "zzz"}, {"id": "zzz", "bits": 4}, {"id": ""},
                  dict(doc["codec"], unexpected_option=1)):
        d = dict(doc, codec=codec)
        e = rejects(build(d, payload))
        assert "codec" in str(e).lower()
    for codec in ({"id": 5}, {}, [], "none", None):
        rejects(build(dict(doc, codec=codec), payload), "codec")


@pytest.mark.parametrize("codec", [
    {"id": "int", "bits": 5, "group_size": 128},
    {"id": "int", "bits": 4, "group_size": 1},
    {"id": "int", "bits": "4", "group_size": 128},
    {"id": "int", "bits": 4.0, "group_size": 128},
    {"id": "int", "bits": True, "group_size": 128},
    {"id": "int", "bits": [4], "group_size": 128},
    {"id": "int", "bits": 2, "group_size": 128},
    {"id": "int", "bits": 4, "group_size": 64},
    {"id": "fp8", "scale_mode": "nope"},
    {"id": "fp8", "scale_mode": ["absmax"]},
    {"id": "int4"},
    {"id": "none", "x": 1},
])
def test_invalid_int_and_fp8_configs_in_header(codec):
    doc, payload = split(blob("int4"))
    rejects(build(dict(doc, codec=codec), payload))


@pytest.mark.parametrize("name", CODECS)
def test_header_field_errors(name):
    doc, payload = split(blob(name))
    for key in ("codec", "shape", "dtype", "axis", "meta", "arrays"):
        d = dict(doc)
        del d[key]
        rejects(build(d, payload), key)
    bad_values = {
        "shape": [None, "3", [-1], [1.5], [True], {"a": 1}, [2**40]],
        "dtype": ["float64", "int8", None, [], {}, 3, "torch.float32"],
        "axis": [-1, 3, 99, "0", None, 1.0, []],
        "meta": [[], "x", 3, None],
        "arrays": [{}, "x", None, [None], [{"name": 3}], [{}]],
    }
    for key, values in bad_values.items():
        for v in values:
            rejects(build(dict(doc, **{key: v}), payload))
    for head in (b"", b"null", b"[]", b"3", b'"x"', b"{", b"\xff\xfe", b"{}",
                 b"[" * 50_000 + b"]" * 50_000, b'{"a": ' + b"9" * 5000 + b"}",
                 json.dumps(doc).encode() + b"\0"):
        rejects(build(head, payload))


@pytest.mark.parametrize("name", CODECS)
def test_array_spec_errors(name):
    doc, payload = split(blob(name))
    specs = doc["arrays"]
    first = specs[0]
    variants = [
        [dict(first, dtype="complex64")] + specs[1:],
        [dict(first, dtype=None)] + specs[1:],
        [dict(first, dtype=["uint8"])] + specs[1:],
        [dict(first, shape="3")] + specs[1:],
        [dict(first, shape=[-1])] + specs[1:],
        [dict(first, name=None)] + specs[1:],
        specs + [first],  # duplicate name
        specs[:-1],  # one array missing: trailing payload bytes
        specs + [{"name": "extra", "dtype": "uint8", "shape": [0]}],  # unexpected array
    ]
    for v in variants:
        rejects(build(dict(doc, arrays=v), payload))
    # arrays listed in another order: the bytes are re-cut, which can be well-formed
    outcome(build(dict(doc, arrays=list(reversed(specs))), payload))
    # the same bytes reinterpreted as another array dtype of the same item size
    same_size = {"uint8": "int8", "int8": "uint8", "uint16": "float16", "float16": "int16",
                 "int16": "uint16", "float32": "int32", "int32": "float32", "uint32": "int32",
                 "uint64": "int64", "int64": "uint64", "float64": "uint64"}
    for i, spec in enumerate(specs):
        alt = [dict(t) for t in specs]
        alt[i]["dtype"] = same_size[spec["dtype"]]
        rejects(build(dict(doc, arrays=alt), payload), "must be")
    rejects(build(doc, payload + b"\0"), "trailing")
    rejects(build(doc, payload[:-1]))


@pytest.mark.parametrize("name", CODECS)
def test_tensor_shape_or_dtype_changed_in_header(name):
    doc, payload = split(blob(name, (2, 3, 130)))
    # another number of groups: the arrays cannot match
    for shape in ([2, 3, 130, 2], [2, 4, 130], [2, 3, 300], [2, 3, 1], []):
        d = dict(doc, shape=shape, axis=min(doc["axis"], max(len(shape) - 1, 0)))
        rejects(build(d, payload))
    # the same number of groups: codecs that store padded groups cannot tell
    for shape in ([2, 3, 129], [2, 3, 131]):
        outcome(build(dict(doc, shape=shape), payload))
    # the same values arranged otherwise may legitimately decode (or be refused)
    for shape, axis in (([3, 2, 130], 2), ([6, 130], 1), ([780], 0), ([2, 3, 130], 0)):
        outcome(build(dict(doc, shape=shape, axis=axis), payload))
    for dt in ("float32", "float16", "bfloat16"):
        r = outcome(build(dict(doc, dtype=dt), payload))
        assert r == "ok" or dt != doc["dtype"]


def test_meta_tampering_for_baselines():
    doc, payload = split(blob("int4"))
    for meta in ({}, {"sdtype": "float64"}, {"sdtype": None}, {"sdtype": "float16", "x": 1},
                 {"sdtype": ["float16"]}):
        rejects(build(dict(doc, meta=meta), payload))
    # declaring float32 scales while the arrays hold float16 ones
    rejects(build(dict(doc, meta={"sdtype": "float32"}), payload))


# ---------------------------------------------------------------- fuzzing


@st.composite
def byte_mutations(draw, n: int):
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["replace", "insert", "delete", "flip"]))
        pos = draw(st.integers(0, n - 1))
        if kind == "replace":
            ops.append((kind, pos, draw(st.binary(min_size=1, max_size=8))))
        elif kind == "insert":
            ops.append((kind, pos, draw(st.binary(min_size=1, max_size=8))))
        elif kind == "delete":
            ops.append((kind, pos, draw(st.integers(1, 8))))
        else:
            ops.append((kind, pos, draw(st.integers(0, 7))))
    return ops


def apply_ops(b: bytes, ops) -> bytes:
    m = bytearray(b)
    for kind, pos, arg in ops:
        pos = min(pos, max(len(m) - 1, 0))
        if kind == "replace":
            m[pos : pos + len(arg)] = arg
        elif kind == "insert":
            m[pos:pos] = arg
        elif kind == "delete":
            del m[pos : pos + arg]
        elif m:
            m[pos] ^= 1 << arg
    return bytes(m)


@pytest.mark.parametrize("name", CODECS)
@FUZZ
@given(data=st.data())
def test_fuzz_byte_mutations(name, data):
    b = blob(name)
    doc, payload = split(b)
    start = len(b) - 4 - len(payload)
    # aim half the mutations at the payload, where a valid CRC lets the codec see them
    region = data.draw(st.sampled_from(["any", "payload", "header"]))
    ops = data.draw(byte_mutations(len(b)))
    if region == "payload" and payload:
        ops = [(k, start + p % len(payload), a) for k, p, a in ops]
    elif region == "header":
        ops = [(k, p % start, a) for k, p, a in ops]
    m = apply_ops(b, ops)
    if m == b:
        return
    fix_crc = data.draw(st.booleans())
    if fix_crc and len(m) >= 4:
        m = recrc(m)
        outcome(m)
    else:
        # without a matching CRC nothing may get through
        assert outcome(m) == "error"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=True)
    | st.text(max_size=8) | st.sampled_from(["uint8", "float16", "float32", "uint64", "int",
                                             "ecco", "none", "fp8", "codes", "blocks"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


@st.composite
def header_mutation(draw, doc: dict):
    d = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["shape", "axis", "dtype", "meta", "codec", "arr_shape",
                                       "arr_dtype", "arr_name", "arr_order", "any"]))
        if target == "shape":
            shape = list(d["shape"]) if isinstance(d["shape"], list) else [1]
            if shape and draw(st.booleans()):
                i = draw(st.integers(0, len(shape) - 1))
                shape[i] = max(0, shape[i] + draw(st.integers(-3, 3))) if isinstance(
                    shape[i], int) else 1
            else:
                shape = draw(st.lists(st.integers(0, 300), max_size=4))
            d["shape"] = shape
        elif target == "axis":
            d["axis"] = draw(st.integers(-2, 5))
        elif target == "dtype":
            d["dtype"] = draw(st.sampled_from(["float32", "float16", "bfloat16", "int8"]))
        elif target == "meta":
            meta = d["meta"] if isinstance(d["meta"], dict) else {}
            meta[draw(st.sampled_from(["sdtype", "scale", "x"]))] = draw(_JSON)
            d["meta"] = meta
        elif target == "codec":
            cfg = d["codec"] if isinstance(d["codec"], dict) else {"id": "none"}
            key = draw(st.sampled_from(sorted(cfg) + ["extra"]))
            cfg[key] = draw(_JSON | st.sampled_from([2, 3, 4, 8, 32, 128, "ecco2", "ecco4"]))
            d["codec"] = cfg
        elif target in ("arr_shape", "arr_dtype", "arr_name") and isinstance(d["arrays"], list) \
                and d["arrays"] and isinstance(d["arrays"][0], dict):
            i = draw(st.integers(0, len(d["arrays"]) - 1))
            spec = d["arrays"][i]
            if not isinstance(spec, dict):
                continue
            if target == "arr_shape":
                shp = spec.get("shape") if isinstance(spec.get("shape"), list) else [0]
                spec["shape"] = draw(st.sampled_from([
                    [max(0, (shp[0] if shp and isinstance(shp[0], int) else 0)
                         + draw(st.integers(-9, 9)))],
                    shp + [1], shp[:-1], [0], [2**39],
                ]))
            elif target == "arr_dtype":
                spec["dtype"] = draw(st.sampled_from(["uint8", "int8", "uint16", "float16",
                                                      "float32", "uint64", "int64", "bool"]))
            else:
                spec["name"] = draw(st.sampled_from(["codes", "scale", "zero", "raw", "blocks",
                                                     "tscale", "x"]))
        elif target == "arr_order" and isinstance(d["arrays"], list):
            d["arrays"] = draw(st.permutations(d["arrays"]))
        else:
            d[draw(st.sampled_from(list(d)))] = draw(_JSON)
    return d


@pytest.mark.parametrize("name", CODECS)
@FUZZ
@given(data=st.data())
def test_fuzz_header_with_valid_crc(name, data):
    doc, payload = split(blob(name))
    d = data.draw(header_mutation(doc))
    cut = data.draw(st.sampled_from([0, 0, 0, 1, 7, -1, -8]))
    p = payload[:cut] if cut < 0 else payload + bytes(cut)
    outcome(build(d, p))


@pytest.mark.parametrize("name", CODECS)
def test_random_payloads_with_valid_crc(name):
    """Arbitrary payload bytes of the right size: validation or decode, never a crash."""
    b = blob(name, (3, 300), 1)
    doc, payload = split(b)
    rng = random.Random(name)
    results = set()
    for i in range(30):
        if i % 3 == 0:
            p = rng.randbytes(len(payload))
        elif i % 3 == 1:
            p = bytes([rng.choice([0, 0xFF])]) * len(payload)
        else:
            m = bytearray(payload)
            for _ in range(rng.randrange(1, 20)):
                m[rng.randrange(len(m))] = rng.randrange(256)
            p = bytes(m)
        results.add(outcome(build(doc, p)))
    assert results <= {"ok", "error"}
