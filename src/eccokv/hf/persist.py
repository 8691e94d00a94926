"""The EccoCache file: `cache.save(path)` and `EccoCache.load(path, model.config)`.

    read_cache_file(data, config) -> dict      # parse + validate bytes (no model needed)
    load_bytes(data, config, **cache_kwargs)   # -> EccoCache
    dump_bytes(cache, token_ids=None) -> bytes

The file is a `eccokv.store.container` (magic b"ECKF", version 1): a JSON header and
checksummed sections. The header records the model fingerprint (`model_fingerprint`: a
hash of the text config), the eccokv and chunk-format versions, the cache settings
(residual, sink, exact dtype, sliding), every layer's codec configs and axes, and every
layer's state: per stream the exact sink length, the held tensor's shape and dtype, the
chunk table (per chunk, per batch element, an index into the chunk blobs: beams that share
a chunk share one blob), each chunk's valid token count (a crop may cut a chunk), and the
token ids the cache was built from (or null when unknown). Sections: one per held tensor
(raw bytes), one per unique chunk (`Compressed.to_bytes()`, itself versioned and
checksummed), one for the token ids (int64).

Everything is checked before the cache is built: magic, version, every CRC, the
fingerprint against the given config, the codec configs against the codecs this eccokv
builds (so another codec version or profile is refused, naming both), every shape against
the config (kv heads, head_dim), every length against the data. Any problem raises
`CacheFileError` (a ValueError) naming it; nothing is half-built.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from eccokv.codecs.base import DTYPE_BY_NAME, SUPPORTED_DTYPES, CodecError, Compressed
from eccokv.store.container import ContainerError, need, pack, unpack

MAGIC = b"ECKF"
VERSION = 1
_VOLATILE = ("_name_or_path", "transformers_version", "_commit_hash", "name_or_path")


class CacheFileError(ValueError):
    """A cache file (or its bytes) that cannot be loaded into this model/eccokv."""


# ------------------------------------------------------------------ model identity


def text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def model_fingerprint(config: Any) -> str:
    """sha256 (32 hex) of the model's text config (public fields, sorted; names of the
    folder it came from and the transformers version left out). Same architecture and
    shapes -> same fingerprint; it does not hash the weights."""
    d = text_config(config).to_dict()
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in _VOLATILE}
    blob = json.dumps(d, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def model_summary(config: Any) -> str:
    t = text_config(config)
    return (f"{getattr(t, 'model_type', '?')} with {getattr(t, 'num_hidden_layers', '?')} "
            f"layers, {getattr(t, 'num_key_value_heads', '?')} KV heads, head_dim "
            f"{kv_shape(config)[1]}")


def kv_shape(config: Any) -> tuple[int, int]:
    """(kv heads, head_dim) of the model's attention layers."""
    t = text_config(config)
    heads = int(t.num_attention_heads)
    kv = getattr(t, "num_key_value_heads", None) or heads
    hd = getattr(t, "head_dim", None) or t.hidden_size // heads
    return int(kv), int(hd)


# ------------------------------------------------------------------ tensors


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_from(buf: bytes | memoryview, dtype_name: str, shape: list[int],
                what: str) -> torch.Tensor:
    if dtype_name not in DTYPE_BY_NAME:
        raise CacheFileError(f"{what}: unsupported dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool)
                                              and 0 <= s < (1 << 31) for s in shape):
        raise CacheFileError(f"{what}: invalid shape {str(shape)[:80]}")
    dt = DTYPE_BY_NAME[dtype_name]
    n = math.prod(shape) * torch.empty((), dtype=dt).element_size()
    if len(buf) != n:
        raise CacheFileError(f"{what}: {len(buf)} bytes, shape {shape} {dtype_name} needs {n}")
    if n == 0:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dt).reshape(shape)


# ------------------------------------------------------------------ cache settings


def cache_settings(cache: Any) -> dict[str, Any]:
    """What EccoCache(config, ...) needs to rebuild `cache`'s layers (JSON-able)."""
    from eccokv.hf.cache import EccoLayer

    layers: list[dict[str, Any] | None] = []
    exact = None
    for layer in cache.layers:
        if isinstance(layer, EccoLayer):
            layers.append({"key": layer.spec.key.describe(), "value": layer.spec.value.describe()})
            if layer.exact_dtype is not None:
                exact = SUPPORTED_DTYPES[layer.exact_dtype]
        else:
            layers.append(None)
    return {"residual_length": cache.residual_length, "sink_tokens": cache.sink_tokens,
            "exact_dtype": exact, "layers": layers}


def build_cache(config: Any, settings: dict[str, Any], **overrides: Any) -> Any:
    """A fresh EccoCache with `settings` (from `cache_settings`), each codec config checked
    to be exactly what this eccokv builds from it."""
    from eccokv import codecs as C
    from eccokv.hf.cache import EccoCache

    specs = {}
    for i, spec in enumerate(settings["layers"]):
        if spec is None:
            continue
        streams = {}
        for part in ("key", "value"):
            cfg, axis = spec[part]["codec"], spec[part]["axis"]
            try:
                codec = C.get(cfg)
            except (KeyError, TypeError, ValueError) as e:
                raise CacheFileError(f"layer {i} {part} codec {cfg} cannot be built by this "
                                     f"eccokv: {e}") from None
            if codec.get_config() != cfg:
                raise CacheFileError(f"layer {i} {part} codec: the data was written by codec "
                                     f"{cfg}, this eccokv builds {codec.get_config()}")
            rs = spec[part].get("row_scale")
            if rs is None:
                streams[f"{part}_codec"] = (codec, axis)
            else:
                if (not isinstance(rs, list) or len(rs) > 1 << 20
                        or not all(isinstance(v, (int, float)) for v in rs)):
                    raise CacheFileError(f"layer {i} {part}: row_scale must be a list of "
                                         "numbers")
                from eccokv.hf.spec import stream

                try:
                    streams[f"{part}_codec"] = stream(codec, axis, row_scale=rs)
                except ValueError as e:
                    raise CacheFileError(f"layer {i} {part}: {e}") from None
        specs[i] = streams
    layer_types = _layer_types(config)
    sliding = "compress" if any(layer_types[i] != "full_attention" for i in specs) else "native"
    exact = settings.get("exact_dtype")
    kw: dict[str, Any] = dict(residual_length=settings["residual_length"],
                              sink_tokens=settings["sink_tokens"], layers=specs,
                              sliding=sliding,
                              exact_dtype=None if exact is None else DTYPE_BY_NAME[exact])
    kw.update(overrides)
    return EccoCache(config, **kw)


def _layer_types(config: Any) -> list[str]:
    from transformers.cache_utils import get_layer_types_and_kwargs

    return list(get_layer_types_and_kwargs(text_config(config))[0])


# ------------------------------------------------------------------ layer state


def restore_stream(stream: Any, held: torch.Tensor, sink_len: int,
                   chunks: list[list[Compressed]], valid: list[int]) -> None:
    """Set an `_Stream` to a checked state (see `EccoLayer`)."""
    from eccokv.hf.cache import _tokens

    stream.held, stream.sink_len = held, sink_len
    stream.chunks, stream.valid = chunks, list(valid)
    stream.compressed_len = sum(valid)
    D = held.shape[-1]
    stream.cut = any(v != _tokens(ch[0], D) for v, ch in zip(valid, chunks, strict=True))


def init_layer(layer: Any, dtype: torch.dtype, kv: int, hd: int, batch: int = 1) -> None:
    """Run an EccoLayer's lazy initialisation as its first update would."""
    k = torch.empty((batch, kv, 0, hd), dtype=dtype)
    layer.lazy_initialization(k, k)


def check_chunk(c: Compressed, codec: Any, kv: int, hd: int, what: str) -> int:
    """Validate a parsed chunk against the layer's codec and the model's shapes; tokens."""
    try:
        codec.check_compatible(c)
        codec.validate(c)
        # decoded once here, so a chunk that cannot be decoded (valid checksums over corrupt
        # Ecco blocks) fails the load, not a later generate()
        codec.decode(c, out=torch.empty(c.shape, dtype=torch.float32))
    except CodecError as e:
        raise CacheFileError(f"{what}: {e}") from None
    if len(c.shape) == 3 and c.shape[0] == kv and c.shape[2] == hd:
        return c.shape[1]
    if len(c.shape) == 2 and c.shape[0] == kv and c.shape[1] % hd == 0:
        return c.shape[1] // hd
    raise CacheFileError(f"{what}: chunk shape {c.shape} does not fit {kv} KV heads x head_dim "
                         f"{hd}")


# ------------------------------------------------------------------ dump


def dump_bytes(cache: Any, token_ids: Any = None) -> bytes:
    """The cache file's bytes (see the module docstring)."""
    from eccokv import __version__
    from eccokv.codecs.serialize import FORMAT_VERSION
    from eccokv.hf.cache import EccoLayer

    cfg = cache.layers[0].attn_config if cache.layers and isinstance(
        cache.layers[0], EccoLayer) else None
    sections: list[tuple[str, bytes]] = []
    blobs: dict[int, int] = {}
    layers = []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, EccoLayer):
            cfg = cfg or layer.attn_config
            rec: dict[str, Any] = {"type": "ecco", "seq": layer.seq}
            if layer.is_initialized and layer.k.held is not None:
                rec["dtype"] = SUPPORTED_DTYPES[layer.dtype]
                for name, s in (("k", layer.k), ("v", layer.v)):
                    tab = []
                    for chunk in s.chunks:
                        row = []
                        for c in chunk:
                            if id(c) not in blobs:
                                blobs[id(c)] = len(blobs)
                                sections.append((f"c{blobs[id(c)]}", c.to_bytes()))
                            row.append(blobs[id(c)])
                        tab.append(row)
                    sections.append((f"l{i}.{name}", tensor_bytes(s.held)))
                    rec[name] = {"sink": s.sink_len, "held": list(s.held.shape),
                                 "held_dtype": SUPPORTED_DTYPES[s.held.dtype],
                                 "chunks": tab, "valid": list(s.valid)}
            layers.append(rec)
        elif type(layer).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer"):
            rec = {"type": type(layer).__name__, "seq": int(layer.get_seq_length())}
            if layer.is_initialized and layer.keys is not None and layer.keys.numel():
                for name, t in (("k", layer.keys), ("v", layer.values)):
                    sections.append((f"l{i}.{name}", tensor_bytes(t)))
                    rec[name] = {"shape": list(t.shape), "dtype": SUPPORTED_DTYPES[t.dtype]}
                rec["cumulative_length"] = int(getattr(layer, "cumulative_length", 0))
            layers.append(rec)
        else:
            raise CacheFileError(f"cannot save layer {i} of type {type(layer).__name__}")
    ids = token_ids if token_ids is not None else getattr(cache, "token_ids", None)
    if ids is not None:
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if ids.dim() == 1:
            ids = ids[None]
        sections.append(("ids", tensor_bytes(ids)))
    header = {"eccokv": __version__, "chunk_format": FORMAT_VERSION,
              "fingerprint": model_fingerprint(cfg) if cfg is not None else None,
              "model": model_summary(cfg) if cfg is not None else None,
              "settings": cache_settings(cache), "layers": layers, "blobs": len(blobs),
              "ids": None if ids is None else list(ids.shape)}
    return pack(MAGIC, VERSION, header, sections)


def save(cache: Any, path: str | os.PathLike, token_ids: Any = None) -> None:
    """Write atomically (temp file in the same folder, then rename)."""
    data = dump_bytes(cache, token_ids)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)


# ------------------------------------------------------------------ load


def read_cache_file(data: bytes | bytearray | memoryview, config: Any) -> dict[str, Any]:
    """Parse and validate cache-file bytes against `config` (the model's config).

    Returns {"header", "sections", "chunks": {blob index: Compressed}}; raises
    CacheFileError naming what is wrong (corrupt, truncated, other model, other codec or
    format version)."""
    try:
        return _read(data, config)
    except CacheFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError,
            RuntimeError) as e:
        raise CacheFileError(f"malformed cache file: {type(e).__name__}: {e}") from None


def _read(data: bytes | bytearray | memoryview, config: Any) -> dict[str, Any]:
    from eccokv.codecs.serialize import FORMAT_VERSION, from_bytes

    try:
        doc, secs = unpack(data, MAGIC, VERSION, "cache file")
    except ContainerError as e:
        raise CacheFileError(str(e)) from None
    except TypeError as e:
        raise CacheFileError(str(e)) from None
    what = "cache file"
    try:
        fp = need(doc, "fingerprint", str, what)
        if doc.get("chunk_format") != FORMAT_VERSION:
            raise CacheFileError(f"cache file chunks are format version "
                                 f"{doc.get('chunk_format')}, this eccokv reads {FORMAT_VERSION}")
        mine = model_fingerprint(config)
        if fp != mine:
            raise CacheFileError(f"cache file was saved from model {doc.get('model')} "
                                 f"(fingerprint {fp}); this model is {model_summary(config)} "
                                 f"(fingerprint {mine})")
        need(doc, "settings", dict, what)
        need(doc, "layers", list, what)
        nblobs = need(doc, "blobs", int, what)
    except ContainerError as e:
        raise CacheFileError(str(e)) from None
    if nblobs > len(secs):
        raise CacheFileError(f"cache file names {nblobs} chunks but holds {len(secs)} sections")
    chunks: dict[int, Compressed] = {}
    for j in range(nblobs):
        if f"c{j}" not in secs:
            raise CacheFileError(f"cache file lacks chunk section c{j}")
        try:
            chunks[j] = from_bytes(secs[f"c{j}"])
        except (CodecError, ValueError, TypeError) as e:
            raise CacheFileError(f"cache file chunk {j}: {e}") from None
    return {"header": doc, "sections": secs, "chunks": chunks}


def load_bytes(data: bytes | bytearray | memoryview, config: Any, **cache_kwargs: Any) -> Any:
    """EccoCache from cache-file bytes (everything validated first; see module docstring)."""
    parsed = read_cache_file(data, config)
    doc, secs, chunks = parsed["header"], parsed["sections"], parsed["chunks"]
    try:
        settings = doc["settings"]
        for k in ("residual_length", "sink_tokens", "layers"):
            if k not in settings:
                raise CacheFileError(f"cache file settings lack {k!r}")
        cache = build_cache(config, settings, **cache_kwargs)
        _fill(cache, doc, secs, chunks, config)
    except CacheFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError,
            RuntimeError) as e:
        raise CacheFileError(f"cache file does not fit this model/eccokv: "
                             f"{type(e).__name__}: {e}") from None
    return cache


def _fill(cache: Any, doc: dict[str, Any], secs: dict[str, memoryview],
          chunks: dict[int, Compressed], config: Any) -> None:
    from eccokv.hf.cache import EccoLayer

    layers = doc["layers"]
    if len(layers) != len(cache.layers):
        raise CacheFileError(f"cache file has {len(layers)} layers, this model "
                             f"{len(cache.layers)}")
    kv, hd = kv_shape(config)
    for i, (rec, layer) in enumerate(zip(layers, cache.layers, strict=True)):
        if not isinstance(rec, dict):
            raise CacheFileError(f"layer {i}: record is not an object")
        kind = rec.get("type")
        if isinstance(layer, EccoLayer) != (kind == "ecco"):
            raise CacheFileError(f"layer {i} is {kind} in the file, {type(layer).__name__} here")
        seq = rec.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise CacheFileError(f"layer {i}: bad token count {seq!r}")
        if kind == "ecco":
            if "k" not in rec:
                if seq:
                    raise CacheFileError(f"layer {i}: {seq} tokens but no state")
                continue
            _fill_ecco(layer, rec, secs, chunks, kv, hd, i)
        else:
            if "k" in rec:
                ks = tensor_from(secs.get(f"l{i}.k", b""), rec["k"]["dtype"], rec["k"]["shape"],
                                 f"layer {i} keys")
                vs = tensor_from(secs.get(f"l{i}.v", b""), rec["v"]["dtype"], rec["v"]["shape"],
                                 f"layer {i} values")
                layer.lazy_initialization(ks, vs)
                layer.keys, layer.values = ks, vs
                if hasattr(layer, "cumulative_length"):
                    layer.cumulative_length = int(rec.get("cumulative_length", ks.shape[-2]))
    ids = doc.get("ids")
    if ids is not None:
        cache.token_ids = _ids_from(secs.get("ids"), ids)


def _ids_from(buf: memoryview | None, shape: Any) -> torch.Tensor:
    if buf is None or not isinstance(shape, list) or len(shape) != 2:
        raise CacheFileError("cache file token ids are missing or malformed")
    if not all(isinstance(s, int) and 0 <= s < (1 << 31) for s in shape) or \
            len(buf) != 8 * shape[0] * shape[1]:
        raise CacheFileError(f"cache file token ids: {len(buf)} bytes for shape {shape}")
    return torch.frombuffer(bytearray(buf), dtype=torch.int64).reshape(shape).clone()


def _fill_ecco(layer: Any, rec: dict[str, Any], secs: dict[str, memoryview],
               chunks: dict[int, Compressed], kv: int, hd: int, i: int) -> None:
    dtype = DTYPE_BY_NAME.get(rec.get("dtype"))
    if dtype is None:
        raise CacheFileError(f"layer {i}: bad dtype {rec.get('dtype')!r}")
    states = {}
    batch = None
    for name, s in (("k", layer.k), ("v", layer.v)):
        r = rec[name]
        held = tensor_from(secs.get(f"l{i}.{name}", b""), r["held_dtype"], r["held"],
                           f"layer {i} {name} exact tokens")
        if held.dim() != 4 or held.shape[1] != kv or held.shape[3] != hd:
            raise CacheFileError(f"layer {i} {name}: exact tokens {tuple(held.shape)} do not "
                                 f"fit {kv} KV heads x head_dim {hd}")
        batch = held.shape[0] if batch is None else batch
        if held.shape[0] != batch:
            raise CacheFileError(f"layer {i}: K and V batch sizes differ")
        sink = r["sink"]
        if not isinstance(sink, int) or not 0 <= sink <= held.shape[2] or \
                sink > layer.sink_tokens:
            raise CacheFileError(f"layer {i} {name}: bad sink length {sink!r}")
        tab, valid = r["chunks"], r["valid"]
        if not isinstance(tab, list) or not isinstance(valid, list) or len(tab) != len(valid):
            raise CacheFileError(f"layer {i} {name}: chunk table and valid counts differ")
        rows = []
        for j, (row, v) in enumerate(zip(tab, valid, strict=True)):
            if not isinstance(row, list) or len(row) != batch:
                raise CacheFileError(f"layer {i} {name} chunk {j}: needs {batch} batch entries")
            cs = []
            for b in row:
                if not isinstance(b, int) or b not in chunks:
                    raise CacheFileError(f"layer {i} {name} chunk {j}: unknown blob {b!r}")
                n = check_chunk(chunks[b], s.spec.codec, kv, hd, f"layer {i} {name} chunk {j}")
                if not isinstance(v, int) or not 0 < v <= n:
                    raise CacheFileError(f"layer {i} {name} chunk {j}: valid {v!r} of {n} tokens")
                cs.append(chunks[b])
            rows.append(cs)
        states[name] = (held, sink, rows, valid)
    lens = {name: st[0].shape[2] + sum(st[3]) for name, st in states.items()}
    if lens["k"] != lens["v"] or lens["k"] != rec["seq"]:
        raise CacheFileError(f"layer {i}: K holds {lens['k']} tokens, V {lens['v']}, the "
                             f"layer {rec['seq']}")
    init_layer(layer, dtype, kv, hd, batch or 1)
    if layer.k.exact_dtype != states["k"][0].dtype:
        raise CacheFileError(f"layer {i}: exact tokens are {states['k'][0].dtype}, this cache "
                             f"stores {layer.k.exact_dtype}")
    for name, s in (("k", layer.k), ("v", layer.v)):
        restore_stream(s, *states[name])
    layer.seq = rec["seq"]
    layer.keys, layer.values = layer.k.held, layer.v.held


def load(path: str | os.PathLike, config: Any, **cache_kwargs: Any) -> Any:
    """EccoCache from a file written by `save` (see `load_bytes`)."""
    with open(path, "rb") as f:
        data = f.read()
    return load_bytes(data, config, **cache_kwargs)
