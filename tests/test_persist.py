"""cache.save(path) / EccoCache.load(path, model.config): the loaded cache continues
generation bit-identically; other models, codec versions and damaged files are refused
with a message naming what is wrong; a failed load changes nothing."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch

from eccokv.hf.cache import EccoCache
from eccokv.hf.persist import MAGIC, CacheFileError, dump_bytes, load_bytes, model_fingerprint
from eccokv.store.container import pack, unpack
from test_cache import _ids, tiny


def _continue(model, cache, ids):
    """Logits of a multi-token step, then one token per step."""
    out = []
    with torch.no_grad():
        out.append(model(ids[:, :40], past_key_values=cache).logits)
        for t in range(40, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    return torch.cat(out, 1)


def _built(family="llama", codec="ecco4", n=400, batch=1, **kw):
    model, cfg = tiny(family, head_dim=32)
    cache = EccoCache(cfg, codec, **kw)
    ids = _ids(batch, n, seed=2)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return model, cfg, cache, ids


@pytest.mark.parametrize("family,codec,kw", [
    ("llama", "ecco4", {}),
    ("llama", "kivi4", {"residual_length": 32}),
    ("qwen2", "int4", {"exact_dtype": torch.float32}),
    ("gemma3", "ecco4", {}),  # sliding layers stay transformers' own (saved exactly)
    ("llama", "none", {"sink_tokens": 0}),
])
def test_load_continues_bit_identically(tmp_path, family, codec, kw):
    model, cfg, cache, ids = _built(family, codec, **kw)
    path = tmp_path / "c.ekc"
    cache.save(path, token_ids=ids)
    loaded = EccoCache.load(path, model.config)
    assert loaded.get_seq_length() == cache.get_seq_length()
    assert torch.equal(loaded.token_ids, ids)
    nxt = _ids(1, 48, seed=7)
    assert torch.equal(_continue(model, cache, nxt), _continue(model, loaded, nxt))


def test_batch_beams_share_chunks_and_crop_state(tmp_path):
    model, cfg, cache, ids = _built(batch=2, n=420)
    cache.batch_repeat_interleave(2)  # beams share their chunks
    cache.crop(-150)  # cuts into the compressed chunk
    data = dump_bytes(cache)
    doc, secs = unpack(data, MAGIC, 1, "t")
    assert doc["blobs"] == 2 * 2 * 2  # 2 layers, K and V, 2 sequences (4 beams share them)
    loaded = load_bytes(data, cfg)
    for a, b in zip(cache.layers, loaded.layers, strict=True):
        assert (a.k.valid, a.k.cut, a.seq) == (b.k.valid, b.k.cut, b.seq)
        assert b.k.chunks[0][0] is b.k.chunks[0][1]
    nxt = _ids(4, 45, seed=3)
    assert torch.equal(_continue(model, cache, nxt), _continue(model, loaded, nxt))


def test_other_model_refused_naming_both(tmp_path):
    _, cfg, cache, _ = _built()
    path = tmp_path / "c.ekc"
    cache.save(path)
    _, other = tiny("llama", head_dim=32, layers=3)
    with pytest.raises(CacheFileError, match=r"saved from model llama with 2 layers.*"
                                              r"this model is llama with 3 layers"):
        EccoCache.load(path, other)


def _repack(data: bytes, edit) -> bytes:
    doc, secs = unpack(data, MAGIC, 1, "t")
    doc.pop("sections")
    edit(doc)
    return pack(MAGIC, 1, doc, list(secs.items()))


def test_other_codec_version_refused_naming_both():
    _, cfg, cache, _ = _built()

    def edit(doc):  # data from an eccokv whose Ecco tables differ
        doc["settings"]["layers"][0]["key"]["codec"]["profile_hash"] = "0123456789abcdef"

    with pytest.raises(CacheFileError, match=r"layer 0 key codec .*0123456789abcdef.* cannot be "
                                              r"built by this eccokv: .*wrong Ecco profile"):
        load_bytes(_repack(dump_bytes(cache), edit), cfg)

    def edit_fmt(doc):
        doc["chunk_format"] = 99

    with pytest.raises(CacheFileError, match="format version 99"):
        load_bytes(_repack(dump_bytes(cache), edit_fmt), cfg)


def test_damaged_files_refused():
    _, cfg, cache, _ = _built()
    data = dump_bytes(cache)
    with pytest.raises(CacheFileError, match="truncated"):
        load_bytes(data[: len(data) // 2], cfg)
    flipped = bytearray(data)
    flipped[len(data) - 100] ^= 0x10
    with pytest.raises(CacheFileError, match="checksum"):
        load_bytes(bytes(flipped), cfg)
    head = bytearray(data)
    head[20] ^= 1
    with pytest.raises(CacheFileError, match="checksum|JSON"):
        load_bytes(bytes(head), cfg)
    other = bytearray(data)
    other[4:6] = struct.pack("<H", 2)
    with pytest.raises(CacheFileError, match="version 2"):
        load_bytes(bytes(other), cfg)
    with pytest.raises(CacheFileError, match="not an eccokv cache file"):
        load_bytes(b"GGUF" + data[4:], cfg)


def test_inconsistent_header_with_valid_crc_refused():
    _, cfg, cache, _ = _built()

    def bad_valid(doc):
        doc["layers"][0]["k"]["valid"][0] += 128

    def bad_seq(doc):
        doc["layers"][1]["seq"] += 1

    def bad_blob(doc):
        doc["layers"][0]["v"]["chunks"][0][0] = 99

    for edit, msg in ((bad_valid, "valid"), (bad_seq, "tokens"), (bad_blob, "unknown blob")):
        with pytest.raises(CacheFileError, match=msg):
            load_bytes(_repack(dump_bytes(cache), edit), cfg)


def test_fingerprint_ignores_attention_switch_and_paths():
    _, cfg = tiny("llama", head_dim=32)
    fp = model_fingerprint(cfg)
    EccoCache(cfg)  # switches cfg._attn_implementation to "eccokv"
    cfg._name_or_path = "/somewhere/else"
    assert model_fingerprint(cfg) == fp
    cfg2 = type(cfg)(**{**cfg.to_dict(), "rms_norm_eps": 1e-3})
    assert model_fingerprint(cfg2) != fp


def test_save_is_atomic_and_failed_save_leaves_old_file(tmp_path):
    _, cfg, cache, _ = _built()
    path = tmp_path / "c.ekc"
    cache.save(path)
    before = path.read_bytes()

    class Bad:
        layers = [object()]

    with pytest.raises(CacheFileError):
        EccoCache.save(Bad(), path)  # type: ignore[arg-type]
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.ekc"]
    assert zlib.crc32(before) == zlib.crc32(path.read_bytes())
    json.dumps(unpack(before, MAGIC, 1, "t")[0])  # the header is plain JSON
