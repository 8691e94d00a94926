"""The fuzz campaign (short CI version) and proof that its oracle can fail.

The long run (>= 1M entries) is recorded in benchmarks/fuzz.{json,md}; here a few thousand
entries run in seconds, and planted bugs (a CRC check skipped, a wrong exception type, a
decoder that ignores a header field, a path opened, a slow parse) must each be caught.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from eccokv import fuzz
from eccokv.codecs import serialize
from eccokv.codecs.base import CodecError


@functools.cache
def _targets() -> tuple[fuzz.Target, ...]:
    ts = fuzz.codec_targets()
    fuzz.warm(ts)
    return tuple(ts)


def targets() -> list[fuzz.Target]:
    return list(_targets())


def test_seeds_cover_every_codec_and_keep_the_crc_guarantee():
    import eccokv.codecs as C

    ts = targets()
    names = {t.name.split(":")[1] for t in ts}
    assert set(C.available()) <= names
    assert {"ecco4+profile", "ecco2+profile"} <= names
    assert max(len(t.data) for t in ts) <= fuzz.CRC_HD4_BYTES


def test_short_campaign_is_clean():
    t0 = time.perf_counter()
    r = fuzz.run_campaign(4000, seed=12345, kinds="codec", targets=targets())
    assert r["ok"], r["failures"][:3]
    assert r["entries"] == 4000
    assert r["crashes"] == r["hangs"] == r["wrong_data"] == r["file_opens"] == 0
    assert set(r["rejection_types"]) == {"codec:CodecError"}
    assert set(r["by_mutation"]) == set(fuzz.MUTATIONS) - {"swap"}  # every codec-level class
    for k in fuzz.GUARANTEED:  # rejected every time, by proof (CRC-32 / declared sizes)
        assert set(r["by_mutation"][k]) == {"rejected"}, (k, r["by_mutation"][k])
    assert r["forged_valid"] > 0 and r["accepted_equal"] > 0  # the oracle's other branches
    assert time.perf_counter() - t0 < 120


def test_replay_of_one_entry_is_deterministic():
    a = fuzz.run_campaign(1, seed=7, start=123, kinds="codec", targets=targets())
    b = fuzz.run_campaign(1, seed=7, start=123, kinds="codec", targets=targets())
    assert a["by_mutation"] == b["by_mutation"]


# ------------------------------------------------------------------ planted bugs


def test_catches_a_skipped_checksum(monkeypatch):
    """from_bytes that ignores its CRC: corrupt bytes get through -> wrong data/crashes."""
    real = serialize.zlib.crc32
    orig = serialize.from_bytes

    def lax(b):
        body = bytes(b)[:-4]
        return orig(body + serialize._CRC.pack(real(body) & 0xFFFFFFFF))

    monkeypatch.setattr(serialize, "from_bytes", lax)
    r = fuzz.run_campaign(1500, seed=1, kinds="codec", targets=targets())
    assert not r["ok"]
    assert r["wrong_data"] + r["crashes"] > 0


def test_catches_a_wrong_exception_type(monkeypatch):
    orig = serialize.from_bytes

    def leaky(b):
        try:
            return orig(b)
        except CodecError as e:
            if "checksum" in str(e):
                raise KeyError("checksum") from None
            raise

    monkeypatch.setattr(serialize, "from_bytes", leaky)
    r = fuzz.run_campaign(500, seed=2, kinds="codec", targets=targets())
    assert r["crashes"] > 0
    assert any("KeyError" in f["detail"] for f in r["failures"])


def test_catches_a_decoder_that_ignores_decode_relevant_fields(monkeypatch):
    """A decoder that returns the seed's tensor whatever the bytes say (e.g. a cache hit
    keyed on the wrong thing): forged blobs with other shapes/payloads are wrong data."""
    ts = targets()
    by_data = {t.data: t.expected for t in ts}
    first = ts[0]

    def stale(b):
        fuzz._codec_load(b)  # validation still runs
        return by_data.get(b, first.expected)

    planted = [fuzz.Target(t.name, t.kind, t.data, stale, t.errors, t.equal, t.semantic,
                           t.consistent, t.layout, t.expected) for t in ts]
    r = fuzz.run_campaign(1500, seed=3, kinds="codec", targets=planted)
    assert r["wrong_data"] > 0


def test_catches_a_file_open_and_a_slow_entry():
    t = targets()[0]

    def opener(b):
        open(__file__, "rb").close()
        return fuzz._codec_load(b)

    def slow(b):  # busy for 30 ms of CPU (the hang bound is on CPU time)
        t0 = time.process_time()
        while time.process_time() - t0 < 0.03:
            pass
        return fuzz._codec_load(b)

    for load, key in ((opener, "file_opens"), (slow, "hangs")):
        planted = fuzz.Target(t.name, t.kind, t.data, load, t.errors, t.equal, t.semantic,
                              t.consistent, t.layout, t.expected)
        r = fuzz.run_campaign(20, seed=4, kinds="codec", targets=[planted], hang_s=0.02)
        assert r[key] > 0, r


def test_oracle_equality_is_bitwise():
    a = torch.tensor([0.0, 1.0])
    assert fuzz._bits_equal(a, a.clone())
    assert not fuzz._bits_equal(a, torch.tensor([-0.0, 1.0]))  # -0 == 0 numerically
    assert not fuzz._bits_equal(a, a.to(torch.float16))
    n = torch.tensor([float("nan")])
    assert fuzz._bits_equal(n, n.clone())


def test_cli_fuzz_json(capsys):
    import json

    from eccokv.cli import main

    assert main(["fuzz", "--n", "300", "--seed", "5", "--targets", "codec", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["entries"] == 300 and r["ok"]
    with pytest.raises(SystemExit):
        main(["fuzz", "--n", "x"])
    assert main(["fuzz", "--n", "10", "--targets", "nope"]) == 2


@functools.cache
def _container_targets() -> tuple[fuzz.Target, ...]:
    ts = fuzz.optional_targets({"cache", "store"})
    fuzz.warm(ts)
    return tuple(ts)


def test_cache_files_and_store_entries_short_campaign():
    """Cache files (CacheFileError) and store entries (EntryError), two models, two
    codecs: nothing but the promised errors; splices of another model's file or another
    key's entry are refused."""
    ts = list(_container_targets())
    if not ts:
        pytest.skip("eccokv.store / eccokv.hf.persist or transformers not importable")
    assert {t.kind for t in ts} == {"cache", "store"}
    r = fuzz.run_campaign(1500, seed=99, kinds="cache,store", targets=ts)
    assert r["crashes"] == r["hangs"] == r["wrong_data"] == r["file_opens"] == 0, \
        r["failures"][:3]
    assert set(r["rejection_types"]) == {"cache:CacheFileError", "store:EntryError"}
    assert set(r["by_mutation"]["swap"]) == {"rejected"}
    for k in fuzz.GUARANTEED:
        assert set(r["by_mutation"][k]) == {"rejected"}, (k, r["by_mutation"][k])


def test_mutations_do_not_depend_on_earlier_entries():
    """Entry i's bytes depend only on (seed, i): the same entry after 1,000 others is the
    same (shared JSON atoms edited in place once broke this and grew without bound)."""
    import random

    ts = targets()
    by_kind: dict = {}
    for t in ts:
        by_kind.setdefault(t.kind, []).append(t)

    def entry(i):
        rng = random.Random(11 * 2**32 + i)
        t = ts[rng.randrange(len(ts))]
        return fuzz.mutate(t, rng, [d for d in by_kind[t.kind] if d is not t])

    first = [entry(i) for i in range(200)]
    for i in range(200, 1200):
        entry(i)
    assert [entry(i) for i in range(200)] == first
