"""Fuzz campaign over the untrusted bytes eccokv reads: codec blobs of every registered
codec, and (when those modules are present) cache files and prefix-store entries.

    eccokv fuzz --n 1000000 --seed 0 [--targets codec,cache,store] [--json]

Every entry is a valid seed blob with one mutation (bit flips, bursts, scattered byte
overwrites, truncation/extension/deletion/insertion, header JSON edits with recomputed
CRCs, prefix-field edits, payload edits with recomputed CRCs, splices with another
model's or codec's blob). Each is loaded and decoded under a per-entry time bound and
judged by an oracle (docs/untrusted.md):

- an exception must be the target's promised error type (`CodecError`, `CacheFileError`,
  `EntryError`) with a message; anything else is a crash;
- a mutation that does not recompute checksums must be rejected. For flips of <= 3 bits and
  bursts of <= 32 bits in blobs under 11,450 bytes CRC-32 guarantees it; for lengths that
  change it is the header-declared size; for other overwrites it holds with probability
  1 - 2^-32 per entry. Any acceptance is counted as wrong data;
- a forged entry (checksums recomputed) that loads is either decode-equivalent to the seed
  (same shape, dtype, axis, array bytes and decode-relevant config; the rest is encoder-only
  or unused metadata) and must decode bit-identically, or it is a different valid blob: its
  result must have the shape and dtype its header declares, and (Ecco) equal the readable
  reference decoder's; counted as `forged_valid`, not an error;
- an entry that takes more than `hang_s` of CPU time (the process's, all threads; wall
  time on a shared machine also counts other processes) is a hang; its wall time is
  reported too. One that never returns is killed by a
  faulthandler watchdog after about `kill_s` (it runs outside the GIL, so a kernel stuck
  in a loop is caught too: "Timeout" and the traceback on stderr, exit status 1);
- an entry that opens any file while it loads is a failure (`file_open`, audit hook).

Each entry's mutation comes from `random.Random(seed * 2**32 + i)`, so `--start i --n 1`
replays entry i.
"""

from __future__ import annotations

import faulthandler
import json
import random
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eccokv.codecs.base import CodecError, Compressed

_PREFIX = struct.Struct("<4sHHI")
_CRC = struct.Struct("<I")
# CRC-32 (IEEE) detects every error of <= 3 bits in data of up to 91,607 bits (Koopman,
# "32-Bit Cyclic Redundancy Codes for Internet Applications", 2002) and every burst <= 32.
CRC_HD4_BYTES = 91607 // 8
GUARANTEED = ("bitflip", "burst", "truncate", "extend")
MUTATIONS = ("bitflip", "burst", "bytes", "truncate", "extend", "delete", "insert",
             "header", "header_raw", "prefix", "payload", "splice", "swap")
# Decode-relevant config keys per codec family; other keys only steer the encoder (Ecco:
# candidates, patch_order, trim_passes; "profile" is a label, tables go by profile_hash).
DECODE_KEYS: dict[str, tuple[str, ...]] = {
    "ecco": ("id", "variant", "profile_hash", "group_size"),
    "int": ("id", "bits", "group_size"),
    "fp8": ("id",),
    "none": ("id",),
}
USES_META = {"int"}  # families whose decode reads `meta`


# ------------------------------------------------------------------ targets


@dataclass
class Target:
    """One seed: valid bytes, how to load them, what errors loading may raise."""

    name: str
    kind: str  # "codec" | "cache" | "store"
    data: bytes
    load: Callable[[bytes], Any]
    errors: tuple[type[BaseException], ...]
    equal: Callable[[Any, Any], bool]
    semantic: Callable[[bytes], Any]  # decode-relevant content of loadable bytes
    consistent: Callable[[bytes, Any], bool]  # a forged valid result fits its own header
    layout: str = "eckv"  # "eckv" (prefix, JSON, payload, CRC) or "container"
    expected: Any = None
    # after a successful load: use the loaded object (e.g. decode a loaded cache); a
    # CodecError here is a `late_error` (accepted at load, refused at first use)
    use: Callable[[Any], Any] | None = None


def _bits_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.numel() == 0:
            return True
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        return bool(torch.equal(a.contiguous().view(view[a.element_size()]),
                                b.contiguous().view(view[b.element_size()])))
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_bits_equal(x, y) for x, y in zip(a, b, strict=True)))
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(_bits_equal(a[k], b[k]) for k in a))
    return bool(a == b)


def _codec_load(b: bytes) -> torch.Tensor:
    from eccokv.codecs.serialize import codec_for, from_bytes

    c = from_bytes(b)
    return codec_for(c.codec_config).decode(c)


def compressed_semantic(c: Compressed) -> tuple[Any, ...]:
    """What decoding `c` depends on (see DECODE_KEYS)."""
    fam = c.codec_config.get("id")
    keys = DECODE_KEYS.get(fam)
    cfg = ({k: c.codec_config.get(k) for k in keys} if keys is not None
           else dict(c.codec_config))
    arrays = tuple((k, str(a.dtype), a.shape, a.tobytes()) for k, a in sorted(c.arrays.items()))
    meta = json.dumps(c.meta, sort_keys=True) if (keys is None or fam in USES_META) else ""
    return (json.dumps(cfg, sort_keys=True), c.shape, str(c.dtype), c.axis, arrays, meta)


def _codec_semantic(b: bytes) -> tuple[Any, ...]:
    from eccokv.codecs.serialize import from_bytes

    return compressed_semantic(from_bytes(b))


def _codec_consistent(b: bytes, y: Any) -> bool:
    from eccokv.codecs.serialize import codec_for, from_bytes

    c = from_bytes(b)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != c.shape or y.dtype != c.dtype:
        return False
    codec = codec_for(c.codec_config)
    if c.codec_config.get("id") == "ecco" and c.numel:
        fast = codec.decode(c, out=torch.empty(c.shape, dtype=torch.float32))
        return _bits_equal(fast, codec.decode_reference(c).to(torch.float32))
    return True


def _kv_like(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if x.numel():
        x.view(-1)[:: max(1, x.numel() // 7)] *= 9.0  # a few outliers, as in real K
    return x


def codec_targets() -> list[Target]:
    """Small seed blobs (< 11,450 bytes: the CRC-32 3-bit guarantee) for every registered
    codec preset, in two layouts and dtypes, an empty tensor, and Ecco blobs that carry an
    embedded (non-default) profile."""
    import eccokv.codecs as C
    from eccokv.codecs.ecco import EccoCodec
    from eccokv.codecs.ecco_profile import Profile, VariantTables, default_profile

    cases = [((2, 130), -1, torch.float16), ((3, 1, 70), 0, torch.bfloat16),
             ((1, 2, 64), 2, torch.float32), ((0, 128), 1, torch.float16)]
    out: list[Target] = []
    codecs: list[tuple[str, Any]] = [(n, C.get(n)) for n in C.available()]
    for variant in ("ecco4", "ecco2"):
        d = default_profile().variants[variant]
        lv = d.levels.copy()
        lv[0, lv.shape[1] // 2] += np.float32(1e-3)
        lv[0] = np.sort(lv[0])
        prof = Profile({variant: VariantTables(lv, d.lengths.copy())}, {"fuzz": "custom"})
        codecs.append((f"{variant}+profile", EccoCodec(variant, profile=prof)))
    for name, codec in codecs:
        for k, (shape, axis, dt) in enumerate(cases):
            x = _kv_like(shape, seed=len(out)).to(dt)
            b = codec.encode(x, axis=axis).to_bytes()
            if len(b) > CRC_HD4_BYTES:  # keep the 3-bit guarantee: a smaller tensor
                x = _kv_like((1, shape[-1]), seed=len(out)).to(dt)
                b = codec.encode(x, axis=-1).to_bytes()
            out.append(Target(f"codec:{name}:{'x'.join(map(str, shape))}:{k}", "codec", b,
                              _codec_load, (CodecError,), _bits_equal, _codec_semantic,
                              _codec_consistent))
    return out


def optional_targets(kinds: set[str]) -> list[Target]:
    """Cache-file and store-entry seeds (need transformers and `eccokv.store`)."""
    out: list[Target] = []
    if not kinds & {"cache", "store"}:
        return out
    try:
        import transformers  # noqa: F401

        from eccokv.hf import persist  # noqa: F401
        from eccokv.store import entry, prefix  # noqa: F401
    except ImportError:
        return out
    caches = _seed_caches()
    if "cache" in kinds:
        out += cache_targets(caches)
    if "store" in kinds:
        out += store_targets(caches)
    return out


def _tiny_config(kv_heads: int, head_dim: int, layers: int = 2) -> Any:
    import transformers

    return transformers.LlamaConfig(vocab_size=128, hidden_size=2 * head_dim,
                                    intermediate_size=64, num_hidden_layers=layers,
                                    num_attention_heads=2, num_key_value_heads=kv_heads,
                                    head_dim=head_dim, max_position_embeddings=2048)


def _seed_caches() -> list[tuple[str, Any, Any, torch.Tensor]]:
    """(name, config, EccoCache, token ids): two models, two codecs; every CRC-covered
    region (container header, each section, each chunk blob) stays under 11,450 bytes."""
    from eccokv.hf.cache import EccoCache

    out = []
    for k, (name, kv, hd, codec) in enumerate((("m1/ecco4", 1, 32, "ecco4"),
                                               ("m1/kivi4", 1, 32, "kivi4"),
                                               ("m2/ecco4", 1, 16, "ecco4"))):
        cfg = _tiny_config(kv, hd)
        cache = EccoCache(cfg, codec, residual_length=16, sink_tokens=4, fused=False)
        T = 4 + 256 + 20
        g = torch.Generator().manual_seed(100 + k)
        for i in range(cfg.num_hidden_layers):
            kk = torch.randn((1, kv, T, hd), generator=g).to(torch.bfloat16)
            vv = torch.randn((1, kv, T, hd), generator=g).to(torch.bfloat16)
            cache.update(kk, vv, i)
        ids = torch.randint(3, 128, (1, T), generator=g)
        out.append((name, cfg, cache, ids))
    return out


def _stream_views(cache: Any) -> list[Any]:
    """Everything a loaded cache holds, as tensors: per layer K and V in full (sink,
    decoded chunks, exact window), the token count, and the token ids."""
    res: list[Any] = []
    for layer in cache.layers:
        if hasattr(layer, "k") and layer.k.held is not None:
            for s in (layer.k, layer.v):
                b, h, _, d = s.held.shape
                empty = torch.empty((b, h, 0, d), dtype=s.held.dtype)
                res.append(s.view_with(empty).clone())
        else:
            res.append(None)
        res.append(int(layer.get_seq_length()))
    ids = getattr(cache, "token_ids", None)
    res.append(None if ids is None else ids.clone())
    return res


def _container_semantic(magic: bytes, version: int,
                        informational: tuple[str, ...]) -> Callable[[bytes], Any]:
    def sem(b: bytes) -> Any:
        from eccokv.store.container import unpack

        doc, secs = unpack(b, magic, version, "fuzz")
        d = {k: v for k, v in doc.items() if k not in informational and k != "sections"}
        return (json.dumps(d, sort_keys=True), {k: bytes(v) for k, v in secs.items()})
    return sem


def cache_targets(caches: list[tuple[str, Any, Any, torch.Tensor]]) -> list[Target]:
    """Cache files (`EccoCache.save` bytes) of the seed caches; loading one is
    `load_bytes(data, that model's config)`, promised error `CacheFileError`."""
    from eccokv.hf.persist import MAGIC, VERSION, CacheFileError, dump_bytes, load_bytes

    out = []
    for name, cfg, cache, ids in caches:
        data = dump_bytes(cache, token_ids=ids)

        def load(b: bytes, cfg: Any = cfg) -> Any:
            return load_bytes(b, cfg, fused=False)

        def consistent(b: bytes, y: Any, cfg: Any = cfg) -> bool:
            return isinstance(y, list) and len(y) >= cfg.num_hidden_layers

        out.append(Target(f"cache:{name}", "cache", data, load, (CacheFileError,),
                          _bits_equal, _container_semantic(MAGIC, VERSION, ("model",
                                                                            "eccokv")),
                          consistent, layout="container", use=_stream_views))
    return out


class _MemStore:
    """The two calls `eccokv.store.prefix.write` makes, into a dict."""

    def __init__(self) -> None:
        self.d: dict[str, bytes] = {}

    def exists(self, keys: list[str]) -> list[bool]:
        return [k in self.d for k in keys]

    def put_many(self, items: list[tuple[str, bytes]]) -> int:
        self.d.update(items)
        return len(items)


def store_targets(caches: list[tuple[str, Any, Any, torch.Tensor]]) -> list[Target]:
    """Prefix-store entries of the seed caches, read back under their own key and the
    lookup's expectations (`decode_entry(data, key, expect)`), promised error `EntryError`."""
    from eccokv.store import prefix
    from eccokv.store.entry import MAGIC, VERSION, EntryError, decode_entry

    out = []
    for name, cfg, cache, ids in caches:
        st = _MemStore()
        C = 128
        prefix.write(cache, st, token_ids=ids, chunk_tokens=C)
        plan = prefix._Plan(cache, cfg, cache.layers[0].dtype, C)
        idl = ids[0].tolist()
        n = (len(idl) - 1 - plan.sink) // plan.C
        keys = prefix.chain_keys(plan.root, idl, plan.sink, plan.C, n)
        parent = ""
        for j, key in enumerate(keys):
            if key not in st.d:
                raise RuntimeError(f"fuzz seed: entry {j} of {name} was not written")
            expect = plan.expect(j, parent, plan.chunk_ids(idl, j))
            codecs = plan.codecs

            def load(b: bytes, key: str = key, expect: Any = expect, codecs: Any = codecs) -> Any:
                e = decode_entry(b, key=key, expect=expect)
                res: list[Any] = [e.ids]
                for i, (kp, vp) in enumerate(e.pieces):
                    res += [codecs[i][0].decode(c) for c in kp]
                    res += [codecs[i][1].decode(c) for c in vp]
                res.append(e.sinks)
                return res

            def consistent(b: bytes, y: Any, expect: Any = expect) -> bool:
                return isinstance(y, list) and y[0] == expect.ids

            out.append(Target(f"store:{name}:e{j}", "store", st.d[key], load, (EntryError,),
                              _bits_equal, _container_semantic(MAGIC, VERSION, ()),
                              consistent, layout="container"))
            parent = key
    return out


# ------------------------------------------------------------------ byte layouts


def _fix_eckv(body: bytes | bytearray) -> bytes:
    """ECKV body (without CRC) -> with a valid trailing CRC."""
    return bytes(body) + _CRC.pack(zlib.crc32(body) & 0xFFFFFFFF)


def _eckv_parts(b: bytes) -> tuple[bytes, dict[str, Any], bytes]:
    _, _, _, hlen = _PREFIX.unpack_from(b, 0)
    return b[:_PREFIX.size], json.loads(b[_PREFIX.size:_PREFIX.size + hlen]), \
        b[_PREFIX.size + hlen:-_CRC.size]


def _container_parts(b: bytes) -> tuple[bytes, dict[str, Any], bytes]:
    _, _, _, hlen = _PREFIX.unpack_from(b, 0)
    end = _PREFIX.size + hlen
    return b[:_PREFIX.size], json.loads(b[_PREFIX.size:end]), b[end + _CRC.size:]


def _fix_container(pre: bytes, doc: dict[str, Any], payload: bytes, fix_sections: bool,
                   head: bytes | None = None) -> bytes:
    """Rebuild a container: sections' lengths/CRCs recomputed from `payload` if asked
    (keeping the listed lengths), header CRC always valid."""
    if fix_sections and isinstance(doc.get("sections"), list):
        pos, secs = 0, []
        for s in doc["sections"]:
            if isinstance(s, list) and len(s) == 3 and isinstance(s[1], int) and s[1] >= 0:
                part = payload[pos:pos + s[1]]
                secs.append([s[0], s[1], zlib.crc32(part) & 0xFFFFFFFF])
                pos += s[1]
            else:
                secs.append(s)
        doc = dict(doc, sections=secs)
    if head is None:
        head = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    p = pre[:8] + struct.pack("<I", len(head)) + head
    return p + _CRC.pack(zlib.crc32(p) & 0xFFFFFFFF) + payload


def _fix_eckv_sections(payload: bytes, doc: dict[str, Any]) -> bytes:
    """Inside a container payload, give every section that is an ECKV blob a valid CRC."""
    if not isinstance(doc.get("sections"), list):
        return payload
    out, pos = [], 0
    for s in doc["sections"]:
        if not (isinstance(s, list) and len(s) == 3 and isinstance(s[1], int)):
            break
        part = payload[pos:pos + s[1]]
        if part[:4] == b"ECKV" and len(part) >= 16:
            part = _fix_eckv(part[:-4])
        out.append(part)
        pos += s[1]
    out.append(payload[pos:])
    return b"".join(out)


class Layout:
    """Split/rebuild the bytes of a target so edits can keep checksums valid."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def parts(self, b: bytes) -> tuple[bytes, dict[str, Any], bytes]:
        return _eckv_parts(b) if self.kind == "eckv" else _container_parts(b)

    def build(self, pre: bytes, doc: dict[str, Any] | None, payload: bytes,
              head: bytes | None = None) -> bytes:
        if head is None:
            head = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        if self.kind == "eckv":
            return _fix_eckv(pre[:8] + struct.pack("<I", len(head)) + head + payload)
        return _fix_container(pre, doc or {}, payload, fix_sections=True, head=head)

    def refix(self, b: bytes) -> bytes:
        """Recompute every checksum of (possibly edited) bytes whose header still parses;
        else only the outer CRC (ECKV) / header CRC."""
        if self.kind == "eckv":
            return _fix_eckv(b[:-4]) if len(b) >= 4 else b
        try:
            pre, doc, payload = _container_parts(b)
        except (ValueError, struct.error, UnicodeDecodeError, RecursionError):
            return b
        if not isinstance(doc, dict):
            return b
        return _fix_container(pre, doc, _fix_eckv_sections(payload, doc), fix_sections=True)


# ------------------------------------------------------------------ mutations


_JSON_ATOMS: list[Any] = [None, True, False, 0, 1, -1, 2, 3, 7, 128, 255, 2**31, 2**40,
                          2**63, -(2**63), 1e308, -0.0, 0.5, "", "ecco", "int", "none", "fp8",
                          "ecco4", "ecco2", "float16", "bfloat16", "float32", "uint8",
                          "uint64", "int64", "bool", "object", "blocks", "tscale", "codes",
                          "scale", "zero", "raw", "sdtype", "default", "/etc/passwd",
                          "../../x.ecprof", "0000000000000000", [], {}, [1], [0, 128]]


def _rand_json(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth < 2 and r < 0.1:
        return [_rand_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 2 and r < 0.2:
        return {rng.choice(["id", "x", "shape", "name"]): _rand_json(rng, depth + 1)
                for _ in range(rng.randrange(3))}
    if r < 0.3:
        return rng.randint(-(2**70), 2**70)
    v = rng.choice(_JSON_ATOMS)
    # a fresh copy: the shared [] / {} atoms must never be edited in place (that made later
    # entries depend on earlier ones and grow without bound)
    return json.loads(json.dumps(v)) if isinstance(v, (list, dict)) else v


def _nodes(doc: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _nodes(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _nodes(v, path + (i,))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def edit_json(doc: dict[str, Any], rng: random.Random, donor: dict[str, Any] | None) -> dict:
    """1-3 random edits anywhere in a JSON header (a deep copy is edited)."""
    d = json.loads(json.dumps(doc))
    for _ in range(rng.randint(1, 3)):
        nodes = _nodes(d)[1:]
        if not nodes:
            break
        path = rng.choice(nodes)
        parent, key = _get(d, path[:-1]), path[-1]
        v = parent[key]
        op = rng.random()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or op < 0.3:
            if op < 0.15 and isinstance(parent, dict):
                del parent[key]
                continue
            if op < 0.3 and donor is not None:  # the same field from another seed's header
                try:
                    parent[key] = json.loads(json.dumps(_get(donor, path)))
                    continue
                except (KeyError, IndexError, TypeError):
                    pass
            if op < 0.4 and isinstance(parent, dict):
                parent[rng.choice(["x", "extra", "profile", "profile_hash", "tables"])] = \
                    _rand_json(rng)
                continue
            if op < 0.45 and isinstance(parent, list):
                parent.append(json.loads(json.dumps(v)))
                continue
            parent[key] = _rand_json(rng)
        else:
            parent[key] = rng.choice([v + rng.choice([-2, -1, 1, 2, 8, 128]), v * 2,
                                      v // 2 if isinstance(v, int) else v / 2, 0, -v,
                                      2**40 - 1, float(v)])
    return d


def mutate(t: Target, rng: random.Random, donors: list[Target]) -> tuple[bytes, str, bool]:
    """One mutated copy of t.data: (bytes, mutation kind, checksums recomputed)."""
    b = t.data
    lay = Layout(t.layout)
    n = len(b)
    kind = rng.choice(MUTATIONS if t.kind != "codec" else MUTATIONS[:-1])
    if kind == "swap":  # another model's (cache file) or key's (entry) bytes, unchanged
        other = [d for d in donors if d.data != b
                 and (t.kind != "cache" or _model(d) != _model(t))]
        if other:
            return rng.choice(other).data, kind, False
        kind = "bitflip"
    if kind == "bitflip":
        m = bytearray(b)
        for p in rng.sample(range(n * 8), rng.randint(1, 3)):
            m[p // 8] ^= 1 << (p % 8)
        return bytes(m), kind, False
    if kind == "burst":
        ln = rng.randint(1, 32)
        start = rng.randrange(max(1, n * 8 - ln))
        mask = rng.getrandbits(ln) | 1 | (1 << (ln - 1))
        v = int.from_bytes(b, "little") ^ (mask << start)
        return v.to_bytes(n, "little"), kind, False
    if kind == "bytes":
        m = bytearray(b)
        for p in rng.sample(range(n), min(n, rng.randint(4, 32))):
            m[p] = rng.randrange(256)
        return bytes(m), kind, False
    if kind == "truncate":
        return b[:rng.randrange(n)], kind, False
    if kind == "extend":
        return b + rng.randbytes(rng.randint(1, 64)), kind, False
    if kind == "delete":
        p = rng.randrange(n)
        return b[:p] + b[p + rng.randint(1, 64):], kind, False
    if kind == "insert":
        p = rng.randrange(n + 1)
        return b[:p] + rng.randbytes(rng.randint(1, 64)) + b[p:], kind, False
    pre, doc, payload = lay.parts(b)
    donor = rng.choice(donors) if donors else t
    if kind == "header":
        dpre, ddoc, dpay = lay.parts(donor.data)
        d = edit_json(doc, rng, ddoc)
        head = None
        if rng.random() < 0.1:  # non-canonical JSON text (whitespace, key order)
            head = json.dumps(d, indent=rng.choice([None, 1]), separators=(", ", ": ")).encode()
        return lay.build(pre, d, payload, head), kind, True
    if kind == "header_raw":
        head = bytearray(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())
        for _ in range(rng.randint(1, 4)):
            op, p = rng.random(), rng.randrange(len(head))
            if op < 0.5:
                head[p] = rng.choice(b'{}[]":,0123456789-e.\\ \x00\xff\xc3')
            elif op < 0.75:
                del head[p]
            else:
                head[p:p] = bytes([rng.randrange(256)])
        if lay.kind == "eckv":
            return _fix_eckv(pre[:8] + struct.pack("<I", len(head)) + bytes(head) + payload), \
                kind, True
        p2 = pre[:8] + struct.pack("<I", len(head)) + bytes(head)
        return p2 + _CRC.pack(zlib.crc32(p2) & 0xFFFFFFFF) + payload, kind, True
    if kind == "prefix":
        magic, ver, res, hlen = _PREFIX.unpack_from(b, 0)
        f = rng.randrange(4)
        if f == 0:
            magic = rng.choice([b"ECKV", b"ECKF", b"ECKS", b"\0\0\0\0", rng.randbytes(4)])
        elif f == 1:
            ver = rng.choice([0, 2, 3, 0xFFFF, ver ^ (1 << rng.randrange(16))])
        elif f == 2:
            res = rng.choice([1, 0x8000, 0xFFFF])
        else:
            hlen = rng.choice([0, 1, hlen - 1, hlen + 1, hlen * 2, 2**31, 2**32 - 1,
                               rng.randrange(2**32)])
        m = _PREFIX.pack(magic, ver, res, hlen) + b[_PREFIX.size:]
        return lay.refix(m) if lay.kind == "eckv" else _refix_header_crc(m), kind, True
    if kind == "payload":
        m = bytearray(payload)
        if m:
            for _ in range(rng.randint(1, 8)):
                p = rng.randrange(len(m))
                if rng.random() < 0.5:
                    m[p] ^= 1 << rng.randrange(8)
                else:
                    m[p] = rng.choice([0, 0xFF, rng.randrange(256)])
        else:
            m = bytearray(rng.randbytes(rng.randint(1, 8)))
        return lay.refix(lay.build(pre, doc, bytes(m))), kind, True
    # splice: this header with another seed's payload, or a cut-and-join of two seeds
    dpre, ddoc, dpay = lay.parts(donor.data)
    r = rng.random()
    if r < 0.5:
        return lay.refix(lay.build(pre, doc, dpay)), kind, True
    if r < 0.75:
        return lay.refix(lay.build(dpre, ddoc, payload)), kind, True
    cut = rng.randrange(min(len(payload), len(dpay)) + 1)
    return lay.refix(lay.build(pre, doc, payload[:cut] + dpay[cut:])), kind, True


def _model(t: Target) -> str:
    """The seed's model: "cache:m1/ecco4" -> "m1" (a cache file from the same model with
    another codec is a valid file of that model: not a splice)."""
    return t.name.split(":")[1].split("/")[0]


def _refix_header_crc(m: bytes) -> bytes:
    """Container with an edited prefix: recompute the header CRC where it would lie."""
    _, _, _, hlen = _PREFIX.unpack_from(m, 0)
    end = _PREFIX.size + hlen
    if end + 4 > len(m):
        return m
    return m[:end] + _CRC.pack(zlib.crc32(m[:end]) & 0xFFFFFFFF) + m[end + 4:]


# ------------------------------------------------------------------ the campaign


@dataclass
class Result:
    entries: int = 0
    rejected: Counter = field(default_factory=Counter)  # error type -> count
    by_mutation: dict[str, Counter] = field(default_factory=dict)
    by_target_kind: dict[str, Counter] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    max_entry_s: float = 0.0  # CPU seconds
    max_entry_wall_s: float = 0.0
    slow: Counter = field(default_factory=Counter)  # entry time histogram (ms buckets)
    wall_s: float = 0.0
    file_opens: int = 0

    def count(self, kind: str, tkind: str, outcome: str) -> None:
        self.by_mutation.setdefault(kind, Counter())[outcome] += 1
        self.by_target_kind.setdefault(tkind, Counter())[outcome] += 1

    def totals(self) -> Counter:
        c: Counter = Counter()
        for v in self.by_mutation.values():
            c.update(v)
        return c


_FAIL = ("crash", "wrong_data", "hang", "file_open")
_OPENS: list[str] = []
_AUDIT = [False]


def _audit(event: str, args: tuple) -> None:
    if _AUDIT[0] and event == "open":
        _OPENS.append(str(args[0])[:200] if args else "?")


def _judge_loaded(t: Target, m: bytes, y: Any, fixed: bool) -> tuple[str, str]:
    """Outcome of an entry that loaded (see `judge`)."""
    if t.use is not None:
        try:
            y = t.use(y)
        except CodecError as e:
            return "late_error", f"{type(e).__name__}: {str(e)[:200]}"
        except Exception as e:  # noqa: BLE001
            return "crash", f"at first use: {type(e).__name__}: {str(e)[:300]}"
    _AUDIT[0] = False  # the oracle below may import/open what it likes
    try:
        equal = t.equal(y, t.expected)
    except Exception as e:  # noqa: BLE001
        return "crash", f"oracle comparison failed: {type(e).__name__}: {str(e)[:200]}"
    if equal:
        # decoded exactly as the seed: the mutation kept every decode-relevant byte
        # (or, without a recomputed checksum, slipped past it)
        if not fixed:
            return "wrong_data", "bytes changed without a valid CRC were accepted"
        return "accepted_equal", ""
    if not fixed:
        return "wrong_data", "corrupt bytes decoded to other data"
    try:
        same = t.semantic(m) == t.semantic(t.data)
        ok = t.consistent(m, y)
    except Exception as e:  # noqa: BLE001
        return "crash", f"oracle re-parse failed: {type(e).__name__}: {str(e)[:200]}"
    if same:
        return "wrong_data", "decode-equivalent bytes decoded differently"
    if not ok:
        return "wrong_data", "result does not fit its header / reference"
    return "forged_valid", ""


def judge(t: Target, m: bytes, kind: str, fixed: bool,
          hang_s: float) -> tuple[str, str, float]:
    """Load one mutated entry: (outcome, detail, seconds). Outcomes: rejected,
    accepted_equal, forged_valid, late_error, crash, wrong_data, hang, file_open."""
    n_open = len(_OPENS)
    _AUDIT[0] = True
    t0 = time.process_time()  # CPU time: other processes on a shared machine don't count
    try:
        y = t.load(m)
    except t.errors as e:
        dt = time.process_time() - t0
        _AUDIT[0] = False
        if not str(e):
            return "crash", f"{type(e).__name__} without a message", dt
        out, detail = "rejected", type(e).__name__
    except Exception as e:  # noqa: BLE001  (anything else is what the campaign looks for)
        dt = time.process_time() - t0
        _AUDIT[0] = False
        return "crash", f"{type(e).__name__}: {str(e)[:300]}", dt
    else:
        out, detail = _judge_loaded(t, m, y, fixed)
        dt = time.process_time() - t0
        _AUDIT[0] = False
    if len(_OPENS) > n_open:
        return "file_open", _OPENS[-1], dt
    if dt > hang_s:
        return "hang", f"{dt:.3f} s CPU", dt
    return out, detail, dt


def warm(targets: list[Target]) -> None:
    """Load every seed once (compiles/loads kernels) and record its expected result."""
    import eccokv.kernels.ecco_reference  # noqa: F401  (the oracle's reference decoder)

    for t in targets:
        t.expected = _full(t, t.data)
        if not t.equal(_full(t, t.data), t.expected):
            raise RuntimeError(f"seed {t.name} does not decode deterministically")


def _full(t: Target, b: bytes) -> Any:
    y = t.load(b)
    return t.use(y) if t.use is not None else y


def run_campaign(n: int, seed: int = 0, kinds: str = "codec,cache,store", start: int = 0,
                 hang_s: float = 1.0, kill_s: float = 60.0,
                 progress: Callable[[str], None] | None = None,
                 targets: list[Target] | None = None) -> dict[str, Any]:
    """Run entries start..start+n-1; returns the result dict (see module docstring)."""
    want = {k.strip() for k in kinds.split(",") if k.strip()}
    bad = want - {"codec", "cache", "store"}
    if bad:
        raise ValueError(f"unknown fuzz targets {sorted(bad)}; choose from codec, cache, store")
    if targets is None:
        targets = (codec_targets() if "codec" in want else []) + optional_targets(want)
    if not targets:
        raise ValueError(f"no fuzz targets available for {sorted(want)}")
    warm(targets)
    by_kind: dict[str, list[Target]] = {}
    for t in targets:
        by_kind.setdefault(t.kind, []).append(t)
    sys.addaudithook(_audit)
    res = Result()
    t_start = time.perf_counter()
    last = t_start
    armed = t_start - 2.0
    try:
        for i in range(start, start + n):
            rng = random.Random(seed * 2**32 + i)
            t = targets[rng.randrange(len(targets))]
            donors = [d for d in by_kind[t.kind] if d is not t]
            try:
                for _ in range(8):
                    m, kind, fixed = mutate(t, rng, donors)
                    if m != t.data:
                        break
                else:
                    continue
            except Exception as e:  # a bug of the fuzzer itself: say which entry
                raise RuntimeError(f"fuzz entry {i} ({t.name}): mutating failed: "
                                   f"{type(e).__name__}: {e}") from e
            now = time.perf_counter()
            if now - armed > 1.0:  # re-arming costs ~2 ms: once a second (kill_s + 1 s)
                faulthandler.dump_traceback_later(kill_s, exit=True, file=_watchdog_fd())
                armed = now
            w0 = time.perf_counter()
            outcome, detail, dt = judge(t, m, kind, fixed, hang_s)
            res.max_entry_wall_s = max(res.max_entry_wall_s, time.perf_counter() - w0)
            res.entries += 1
            res.count(kind, t.kind, outcome)
            if outcome == "rejected":
                res.rejected[f"{t.kind}:{detail}"] += 1
            elif (outcome in _FAIL or outcome == "late_error") and len(res.failures) < 50:
                res.failures.append({"entry": i, "target": t.name, "mutation": kind,
                                     "outcome": outcome, "detail": detail,
                                     "bytes_hex": m[:4096].hex()})
            if outcome == "file_open":
                res.file_opens += 1
            res.max_entry_s = max(res.max_entry_s, dt)
            res.slow[_bucket(dt)] += 1
            now = time.perf_counter()
            if progress is not None and now - last > 30:
                last = now
                tot = res.totals()
                progress(f"{res.entries}/{n} entries, {res.entries / (now - t_start):.0f}/s, "
                         + ", ".join(f"{k} {tot[k]}" for k in _FAIL))
    finally:
        faulthandler.cancel_dump_traceback_later()
    res.wall_s = time.perf_counter() - t_start
    return _summary(res, targets, n, seed, start, hang_s, kill_s)


def _watchdog_fd() -> Any:
    """Where the watchdog writes: stderr, or the process's real fd 2 when stderr is
    captured (pytest, a StringIO)."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):
        return sys.__stderr__ if sys.__stderr__ is not None else 2


def _bucket(dt: float) -> str:
    for lim in (0.0001, 0.001, 0.01, 0.1, 1.0):
        if dt <= lim:
            return f"<= {lim * 1000:g} ms"
    return "> 1000 ms"


def _summary(res: Result, targets: list[Target], n: int, seed: int, start: int,
             hang_s: float, kill_s: float) -> dict[str, Any]:
    tot = res.totals()
    guaranteed = sum(res.by_mutation.get(k, Counter())["rejected"] for k in GUARANTEED)
    return {
        "entries": res.entries,
        "seed": seed,
        "start": start,
        "requested": n,
        "crashes": tot["crash"],
        "hangs": tot["hang"],
        "wrong_data": tot["wrong_data"],
        "file_opens": tot["file_open"],
        "rejected": tot["rejected"],
        "accepted_equal": tot["accepted_equal"],
        "forged_valid": tot["forged_valid"],
        "late_errors": tot["late_error"],
        "rejected_guaranteed": guaranteed,
        "rejection_types": dict(sorted(res.rejected.items())),
        "by_mutation": {k: dict(v) for k, v in sorted(res.by_mutation.items())},
        "by_target_kind": {k: dict(v) for k, v in sorted(res.by_target_kind.items())},
        "targets": {k: sum(1 for t in targets if t.kind == k)
                    for k in sorted({t.kind for t in targets})},
        "seed_bytes": {"min": min(len(t.data) for t in targets),
                       "max": max(len(t.data) for t in targets)},
        "entry_time_histogram": dict(sorted(res.slow.items())),
        "max_entry_cpu_s": round(res.max_entry_s, 4),
        "max_entry_wall_s": round(res.max_entry_wall_s, 4),
        "hang_s": hang_s,
        "kill_s": kill_s,
        "wall_s": round(res.wall_s, 1),
        "entries_per_s": round(res.entries / max(res.wall_s, 1e-9), 1),
        "failures": res.failures,
        "ok": tot["crash"] + tot["hang"] + tot["wrong_data"] + tot["file_open"] == 0,
    }


def to_markdown(r: dict[str, Any], env: dict[str, Any] | None = None) -> str:
    """The Markdown report of a campaign result."""
    from eccokv.provenance import header_line

    lines = ["# Fuzz campaign over untrusted eccokv bytes", ""]
    if env is not None:
        lines += [header_line(env), ""]
    lines += [
        f"Command: `{r.get('command', 'eccokv fuzz')}`", "",
        f"- entries: **{r['entries']:,}** (seed {r['seed']}), {r['entries_per_s']:,.0f}/s, "
        f"wall {r['wall_s']:,.0f} s, slowest entry {r['max_entry_cpu_s'] * 1000:.1f} ms CPU "
        f"/ {r['max_entry_wall_s'] * 1000:.1f} ms wall (hang bound {r['hang_s']} s CPU, "
        f"watchdog kill at {r['kill_s']} s wall)",
        f"- crashes **{r['crashes']}**, hangs **{r['hangs']}**, wrong data "
        f"**{r['wrong_data']}**, file opens **{r['file_opens']}**",
        f"- rejected {r['rejected']:,} (every one with the promised error type), forged but "
        f"valid {r['forged_valid']:,}, decode-equivalent edits {r['accepted_equal']:,}, "
        f"late errors {r['late_errors']:,} (a forged cache file accepted by load, refused "
        "with CodecError at its first decode)",
        f"- seeds: {r['targets']}, {r['seed_bytes']['min']}-{r['seed_bytes']['max']} bytes",
        "", "| mutation | entries | rejected | decode-equal | forged valid | failures |",
        "|---|---:|---:|---:|---:|---:|"]
    for k, v in r["by_mutation"].items():
        fails = sum(v.get(f, 0) for f in _FAIL)
        lines.append(f"| {k} | {sum(v.values()):,} | {v.get('rejected', 0):,} | "
                     f"{v.get('accepted_equal', 0):,} | {v.get('forged_valid', 0):,} | "
                     f"{fails} |")
    lines += ["", "| rejection (target:error type) | count |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in r["rejection_types"].items()]
    lines += ["", "| entry CPU time | entries |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in r["entry_time_histogram"].items()]
    lines += ["", "Oracle and mutation classes: docs/untrusted.md. `forged valid`: an entry "
              "whose checksums were recomputed after an edit that yields another "
              "well-formed blob (CRC-32 is an integrity check, not authentication); its "
              "result was checked to fit its own header and, for Ecco, to equal the "
              "reference decoder.", ""]
    return "\n".join(lines)


def write_results(r: dict[str, Any], out_dir: str | Path, env: dict[str, Any]) -> None:
    """benchmarks/fuzz.{json,md} with provenance."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = dict(r, environment=env)
    (out / "fuzz.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    (out / "fuzz.md").write_text(to_markdown(r, env))


