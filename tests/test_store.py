"""The prefix store: a warm prefix is the stored cache cropped, bit for bit, and continuing
from it gives exactly the same logits; every bad entry is a counted miss, never used;
both backends against real storage (a directory, a real Valkey server)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

import eccokv.store as S
from eccokv import codecs as C
from eccokv.hf.cache import EccoCache
from eccokv.hf.persist import dump_bytes, load_bytes
from eccokv.store.prefix import _Plan, chain_keys
from eccokv.store.slicing import slice_tokens
from test_cache import _ids, tiny

L = 1000  # prompt: (1000 - 4 - 128) // 128 * 128 = 768 compressed = 3 chunks of 256


@pytest.fixture(scope="module")
def llama():
    return tiny("llama", head_dim=64)


def _prefill(model, ids, **kw):
    cache = EccoCache(model.config, **kw)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return cache


def _continue(model, cache, ids, start, end):
    """Logits of ids[start:end] in one step, then 6 more tokens one at a time."""
    out = []
    with torch.no_grad():
        out.append(model(ids[:, start:end], past_key_values=cache).logits)
        for t in range(end, end + 6):
            out.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    return torch.cat(out, 1)


def _decoded(stream):
    """Every compressed token, each chunk decoded in its own dtype, plus the held part."""
    parts = [stream.spec.codec.decode(c[0]).reshape(c[0].shape[0], -1, stream.held.shape[-1])
             [:, :v] for c, v in zip(stream.chunks, stream.valid, strict=True)]
    return (torch.cat(parts, 1) if parts else None), stream.held


def _dir(tmp_path, **q):
    qs = "&".join(f"{k}={v}" for k, v in q.items())
    return S.open(f"dir://{tmp_path}/store" + (f"?{qs}" if qs else ""))


# ------------------------------------------------------------------ slicing


@pytest.mark.parametrize("name,layout", [
    (n, lay) for n in ("ecco4", "ecco2", "int4", "int3", "kivi2", "fp8", "none")
    for lay in ("tokens", "channels", "token-major")
    if not (n.startswith("ecco") and lay == "channels")])  # Ecco's 128 > head_dim 64
def test_slice_decodes_to_the_parents_values(name, layout):
    codec = C.get(name)
    x = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(1))
    shape, axis = {"tokens": ((2, 512, 64), 1), "channels": ((2, 512, 64), 2),
                   "token-major": ((2, 512 * 64), 1)}[layout]
    c = codec.encode(x.reshape(shape), axis=axis)
    full = codec.decode(c).reshape(2, 512, 64)
    for a, b in ((0, 256), (256, 512), (128, 384)):
        s = slice_tokens(c, 64, a, b)
        codec.validate(s)
        assert torch.equal(codec.decode(s).reshape(2, b - a, 64), full[:, a:b])
    with pytest.raises(ValueError, match="outside"):
        slice_tokens(c, 64, 0, 600)


# ------------------------------------------------------------------ warm == crop


@pytest.mark.parametrize("fused", [True, False])
def test_warm_prefix_is_the_stored_cache_cropped(tmp_path, fused):
    """Chunk boundary at the crop: same structure, same bits, the same logits through the
    multi-token step and the decode steps after it (fused kernels or not)."""
    _, cfg = tiny("llama", head_dim=64)  # a fresh model per case: `fused` sets its config
    model, _ = tiny("llama", head_dim=64)
    ids = _ids(1, L + 10, seed=3)
    stored = _prefill(model, ids[:, :L], fused=fused)
    store = _dir(tmp_path)
    assert stored.to_store(store, token_ids=ids[:, :L]) == 3
    warm = EccoCache.from_store(store, model, ids[:, :L], fused=fused)
    n = warm.get_seq_length()
    assert n == 4 + 3 * 256 and store.stats()["hits"] == 3
    stored.crop(n - L)
    for a, b in zip(stored.layers, warm.layers, strict=True):
        for sa, sb in ((a.k, b.k), (a.v, b.v)):
            assert (sa.sink_len, sa.compressed_len, sa.exact_len, sa.cut) == (
                sb.sink_len, sb.compressed_len, sb.exact_len, sb.cut) == (4, 768, 0, False)
            (ca, ha), (cb, hb) = _decoded(sa), _decoded(sb)
            assert torch.equal(ca, cb) and torch.equal(ha, hb)
    assert torch.equal(_continue(model, stored, ids, n, L), _continue(model, warm, ids, n, L))


def test_warm_prefix_inside_a_chunk_is_bit_identical(tmp_path, llama):
    """The crop cuts the stored cache's prefill chunk: the warm prefix holds the same
    values (each chunk decoded in its storage dtype) and the same structure."""
    model, cfg = llama
    ids = _ids(1, 1200, seed=4)
    stored = _prefill(model, ids)  # 1024 compressed tokens in one chunk
    store = _dir(tmp_path)
    assert stored.to_store(store, token_ids=ids) == 4
    warm = EccoCache.from_store(store, model, ids[:, :900])  # 3 chunks fit in 900
    n = warm.get_seq_length()
    assert n == 772
    stored.crop(n - 1200)
    for a, b in zip(stored.layers, warm.layers, strict=True):
        for sa, sb in ((a.k, b.k), (a.v, b.v)):
            assert (sa.sink_len, sa.compressed_len, sa.exact_len) == (4, 768, 0)
            assert (sb.sink_len, sb.compressed_len, sb.exact_len) == (4, 768, 0)
            (ca, ha), (cb, hb) = _decoded(sa), _decoded(sb)
            assert torch.equal(ca, cb) and torch.equal(ha, hb)


def test_logits_after_a_crop_inside_a_chunk(tmp_path, llama):
    model, cfg = llama
    ids = _ids(1, 1200, seed=4)
    stored = _prefill(model, ids, fused=False)
    store = _dir(tmp_path)
    stored.to_store(store, token_ids=ids)
    warm = EccoCache.from_store(store, model, ids[:, :900], fused=False)
    n = warm.get_seq_length()
    stored.crop(n - 1200)
    assert torch.equal(_continue(model, stored, ids, n, 900), _continue(model, warm, ids, n, 900))


def test_generate_from_store_computes_only_the_rest(tmp_path, llama):
    model, cfg = llama
    ids = _ids(1, L, seed=5)
    store = _dir(tmp_path)
    cold, _ = S.generate(model, ids, None, max_new_tokens=8, do_sample=False)
    out, cache = S.generate(model, ids, store, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, cold) and store.stats()["puts"] == 3
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(
        lambda m, i, o: seen.append(i[0].shape[1]))
    try:
        out2, _ = S.generate(model, ids, store, max_new_tokens=8, do_sample=False)
    finally:
        hook.remove()
    assert torch.equal(out2, cold)
    assert seen[0] == L - 772  # the first forward computed only the tokens not stored
    assert store.stats()["hits"] == 3 and store.stats()["puts"] == 3  # nothing re-written


def test_longer_prompt_shares_the_prefix_and_extends_it(tmp_path, llama):
    model, cfg = llama
    ids = _ids(1, 1600, seed=6)
    store = _dir(tmp_path)
    S.generate(model, ids[:, :L], store, max_new_tokens=1)
    warm = EccoCache.from_store(store, model, ids)
    assert warm.get_seq_length() == 772
    with torch.no_grad():
        model(ids[:, 772:], past_key_values=warm)
    assert warm.to_store(store) == 2  # chunks 3 and 4 (1600 - 132 -> 1408 compressed)
    assert EccoCache.from_store(store, model, ids).get_seq_length() == 4 + 5 * 256
    other = ids.clone()
    other[0, 300] += 1  # diverges in chunk 1: only chunk 0 matches
    assert EccoCache.from_store(store, model, other).get_seq_length() == 260


def test_keys_chain_over_model_settings_and_tokens(llama):
    model, cfg = llama
    ids = _ids(1, 1100, seed=1)[0].tolist()
    plan = _Plan(EccoCache(cfg), cfg, torch.float32, None)
    k = chain_keys(plan.root, ids, 4, 256, 4)
    assert len(set(k)) == 4
    ids2 = list(ids)
    ids2[700] += 1  # chunk 2 (tokens 516..771)
    assert chain_keys(plan.root, ids2, 4, 256, 4)[:2] == k[:2]
    assert chain_keys(plan.root, ids2, 4, 256, 4)[2:] != k[2:]
    p2 = _Plan(EccoCache(cfg, "ecco3"), cfg, torch.float32, None)
    assert chain_keys(p2.root, ids, 4, 256, 4)[0] != k[0]
    with pytest.raises(ValueError, match="not a multiple of layer 0's compression step"):
        _Plan(EccoCache(cfg), cfg, torch.float32, 200)


# ------------------------------------------------------------------ bad entries


def _stored(tmp_path, model):
    ids = _ids(1, L, seed=8)
    store = _dir(tmp_path)
    S.generate(model, ids, store, max_new_tokens=1)
    return store, ids


def _chain(store, cfg, ids, n=3):
    plan = _Plan(EccoCache(cfg), cfg, torch.float32, None)
    return chain_keys(plan.root, ids[0].tolist(), 4, 256, n)


def test_corrupt_entry_is_a_counted_logged_deleted_miss(tmp_path, llama, caplog):
    model, cfg = llama
    store, ids = _stored(tmp_path, model)
    keys = _chain(store, cfg, ids)
    p = store.path(keys[1])
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x04
    p.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="eccokv.store"):
        for _ in range(2):
            assert EccoCache.from_store(store, model, ids).get_seq_length() == 260
            S.generate(model, ids, store, max_new_tokens=1)  # rewrites the deleted entry
            p.write_bytes(bytes(data))
    st = store.stats()
    assert st["corrupt"] == 2 and st["deleted"] == 2
    assert sum("rejected" in r.message for r in caplog.records) == 1  # logged once per key
    assert "checksum" in caplog.records[0].message


def test_truncated_foreign_spliced_and_other_version_entries_are_misses(tmp_path, llama):
    model, cfg = llama
    store, ids = _stored(tmp_path, model)
    keys = _chain(store, cfg, ids)
    good = {k: store.path(k).read_bytes() for k in keys}
    # another model's entry for the same tokens, written under this key
    m2, c2 = tiny("qwen2", head_dim=64)
    st2 = _dir(tmp_path / "other")
    S.generate(m2, ids, st2, max_new_tokens=1)
    foreign = store.path(keys[0]).read_bytes()
    foreign = next(iter(st2.path(k).read_bytes() for k in st2.keys()))
    v2 = bytearray(good[keys[0]])
    v2[4] = 9  # format version 9 (and so a bad CRC too)
    cases = {
        "truncated": good[keys[0]][:-1000],
        "spliced": good[keys[1]],  # entry 1's bytes under key 0
        "foreign": foreign,
        "version": bytes(v2),
    }
    for name, bad in cases.items():
        store.path(keys[0]).write_bytes(bad)
        before = store.stats()["corrupt"]
        assert EccoCache.from_store(store, model, ids).get_seq_length() == 0, name
        assert store.stats()["corrupt"] == before + 1, name
        assert not store.path(keys[0]).exists(), name  # deleted: it was still the bad bytes
    assert store.stats()["hits"] == 0


def test_entry_with_valid_checksums_but_wrong_tokens_is_rejected(tmp_path, llama):
    from eccokv.store.container import pack, unpack
    from eccokv.store.entry import MAGIC, EntryError, decode_entry

    model, cfg = llama
    store, ids = _stored(tmp_path, model)
    key = _chain(store, cfg, ids)[0]
    doc, secs = unpack(store.path(key).read_bytes(), MAGIC, 1, "t")
    doc.pop("sections")
    secs = dict(secs)
    t = torch.frombuffer(bytearray(secs["ids"]), dtype=torch.int64).clone()
    t[5] += 1
    secs["ids"] = t.numpy().tobytes()
    store.path(key).write_bytes(pack(MAGIC, 1, doc, list(secs.items())))
    assert EccoCache.from_store(store, model, ids).get_seq_length() == 0
    assert store.stats()["corrupt"] == 1
    with pytest.raises(EntryError, match="not an eccokv store entry"):
        decode_entry(b"ECKF" + bytes(100))


# ------------------------------------------------------------------ dir backend


def test_dir_size_limit_evicts_least_recently_used(tmp_path, llama):
    model, cfg = llama
    store, ids = _stored(tmp_path, model)
    size = store.stats()["bytes"] // 3
    small = S.open(f"dir://{tmp_path}/store?max_bytes={int(size * 4.5)}")
    other = _ids(1, L, seed=9)
    S.generate(model, other, small, max_new_tokens=1)  # 6 entries > 4.5 -> evict to <= 4.05
    st = small.stats()
    assert st["bytes"] <= int(size * 4.5) and st["entries"] == 4
    # the first prompt's entries were the least recently used: its chain is broken at 0
    assert EccoCache.from_store(small, model, ids).get_seq_length() == 0
    assert EccoCache.from_store(small, model, other).get_seq_length() == 772


def test_bad_urls_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="dir:///abs/path"):
        S.open("dir://relative/path")
    with pytest.raises(ValueError, match="unknown dir store options"):
        S.open(f"dir://{tmp_path}?maxbytes=1G")
    with pytest.raises(ValueError, match="bad size"):
        S.open(f"dir://{tmp_path}?max_bytes=lots")
    with pytest.raises(ValueError, match="unknown store url"):
        S.open("s3://bucket/x")
    with pytest.raises(ValueError, match="database must be a number"):
        S.open("redis://localhost:6379/abc")


def test_from_store_rejects_batches_and_non_ecco_layers(tmp_path, llama):
    model, cfg = llama
    store = _dir(tmp_path)
    with pytest.raises(ValueError, match="one sequence"):
        EccoCache.from_store(store, model, _ids(2, 300))
    g, gcfg = tiny("gemma3", head_dim=64)
    with pytest.raises(ValueError, match="sliding='compress'"):
        EccoCache.from_store(store, g, _ids(1, 300))
    with pytest.raises(ValueError, match="token ids"):
        _prefill(model, _ids(1, 300)).to_store(store)


# ------------------------------------------------------------------ redis backend


def test_redis_round_trip_split_values_land(redis_url, llama):
    import redis

    model, cfg = llama
    url = redis_url + "&part_bytes=64K"  # entries here are ~140 KB: 3 parts each
    store = S.open(url)
    ids = _ids(1, L, seed=10)
    cold, _ = S.generate(model, ids, None, max_new_tokens=8, do_sample=False)
    S.generate(model, ids, store, max_new_tokens=1)
    st = store.stats()
    assert st["entries"] == 3 and st["keys"] > 3  # the keys really landed (LMCache #2787)
    r = redis.Redis(port=int(url.split(":")[2].split("/")[0]))
    assert r.dbsize() >= st["keys"]
    again = S.open(url)
    assert EccoCache.from_store(again, model, ids).get_seq_length() == 772
    out, _ = S.generate(model, ids, again, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, cold) and again.stats()["hits"] == 6
    assert store.clear() == 3 and store.stats()["keys"] == 0


def test_redis_evicted_part_is_a_miss(redis_url, llama):
    import redis

    model, cfg = llama
    url = redis_url + "&part_bytes=64K"
    store = S.open(url)
    ids = _ids(1, L, seed=11)
    S.generate(model, ids, store, max_new_tokens=1)
    r = redis.Redis(port=int(url.split(":")[2].split("/")[0]))
    prefix = url.split("prefix=")[1].split("&")[0]
    part = sorted(k for k in r.keys(prefix + "*") if k.count(b":") >= 3)[0]
    r.delete(part)  # what an LRU eviction of one part does
    n = EccoCache.from_store(store, model, ids).get_seq_length()
    assert n in (0, 260, 516) and store.stats()["corrupt"] == 0


# ------------------------------------------------------------------ CLI


def test_cli_store_stats_verify_clear(tmp_path, llama):
    model, cfg = llama
    store, ids = _stored(tmp_path, model)
    url = f"dir://{tmp_path}/store"
    key = next(iter(store.keys()))
    p = store.path(key)
    data = bytearray(p.read_bytes())
    data[-10] ^= 1
    p.write_bytes(bytes(data))

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "eccokv.cli", "store", *args, "--url", url,
                            "--json"], capture_output=True, text=True, timeout=120)
        assert r.returncode in (0, 1), r.stderr
        return r.returncode, json.loads(r.stdout)

    rc, st = cli("stats")
    assert rc == 0 and st["entries"] == 3 and st["bytes"] > 0
    rc, v = cli("verify")
    assert rc == 1 and v["ok"] == 2 and len(v["bad"]) == 1 and "checksum" in v["bad"][0][1]
    rc, v = cli("verify", "--delete")
    rc, v = cli("verify")
    assert rc == 0 and v["ok"] == 2
    rc, c = cli("clear")
    assert c["deleted"] == 2
    assert cli("stats")[1]["entries"] == 0


def test_save_of_a_warm_cache_round_trips(tmp_path, llama):
    model, cfg = llama
    store, ids = _stored(tmp_path, model)
    warm = EccoCache.from_store(store, model, ids)
    again = load_bytes(dump_bytes(warm), cfg)
    assert torch.equal(again.token_ids, ids)
    assert torch.equal(_continue(model, warm, ids, 772, L - 6),
                       _continue(model, again, ids, 772, L - 6))


@pytest.mark.parametrize("codec", ["kivi4", "int4", "fp8", "ecco2"])
def test_warm_prefix_bits_for_other_codecs(tmp_path, llama, codec):
    """int (keys over tokens, values over channels), fp8 (per-tensor scale), ecco2: the
    warm prefix holds exactly the cropped stored cache's values."""
    model, cfg = llama
    ids = _ids(1, L, seed=12)
    stored = _prefill(model, ids, codec=codec)
    store = _dir(tmp_path)
    assert stored.to_store(store, token_ids=ids) == 3
    warm = EccoCache.from_store(store, model, ids, codec=codec)
    assert warm.get_seq_length() == 772
    stored.crop(772 - L)
    for a, b in zip(stored.layers, warm.layers, strict=True):
        for sa, sb in ((a.k, b.k), (a.v, b.v)):
            assert (sa.sink_len, sa.compressed_len, sa.exact_len) == (
                sb.sink_len, sb.compressed_len, sb.exact_len)
            (ca, ha), (cb, hb) = _decoded(sa), _decoded(sb)
            assert torch.equal(ca, cb) and torch.equal(ha, hb)
    assert EccoCache.from_store(store, model, ids, codec="ecco4").get_seq_length() == 0
