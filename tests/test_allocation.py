"""eccokv.allocation: the allocation math, the file format and its validation, and
calibration runs (sensitivity, query moments) on tiny random models."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re

import numpy as np
import pytest
import torch
import transformers as T

from eccokv import allocation as A
from eccokv.hf.persist import model_fingerprint

V = 128


class CharTok:
    """One token per character, ids in [3, 128): fits the tiny models' vocabulary."""

    name_or_path = "test-allocation-char-tokenizer"

    def __len__(self) -> int:
        return V

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [3 + ord(c) % (V - 3) for c in text]}


def tiny(layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, seed: int = 0,
         family: str = "llama"):
    cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM),
           "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}[family]
    cfg = cls[0](vocab_size=V, hidden_size=heads * head_dim, intermediate_size=64,
                 num_hidden_layers=layers, num_attention_heads=heads,
                 num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=2048)
    torch.manual_seed(seed)
    return cls[1](cfg).eval()


def _keys(n_layers: int) -> list[tuple[int, str]]:
    return [(l, s) for l in range(n_layers) for s in A.STREAMS]


# ------------------------------------------------------------------ allocation math


@pytest.mark.parametrize("target", [1.5, 2.0, 2.7, 3.0, 4.25, 7.9, 8.0])
@pytest.mark.parametrize("seed", range(4))
def test_allocate_mean_hits_target_exactly(target, seed):
    rng = np.random.default_rng(seed)
    keys = _keys(12)
    c = {k: float(10 ** rng.uniform(-6, 2)) for k in keys}  # 8 decades: clipping happens
    sizes = {k: float(rng.integers(1, 5) * 64) for k in keys}
    for sz in (None, sizes):
        r = A.allocate(c, target, sizes=sz)
        assert set(r) == set(keys)
        assert A.weighted_mean_bits(r, sz) == pytest.approx(target, abs=1e-12)
        assert all(1.5 - 1e-12 <= v <= 8.0 + 1e-12 for v in r.values())


def test_allocate_unclipped_is_the_lagrangian_solution():
    keys = _keys(4)
    c = dict(zip(keys, [1.0, 2.0, 4.0, 8.0, 0.5, 1.0, 3.0, 1.5], strict=True))
    sizes = dict(zip(keys, [1, 2, 1, 2, 1, 2, 1, 3], strict=True))
    w = np.array([sizes[k] for k in keys], float)
    g = math.exp(float((w * np.log([c[k] for k in keys])).sum() / w.sum()))
    r = A.allocate(c, 4.0, sizes=sizes)
    for k in keys:
        assert r[k] == pytest.approx(4.0 + 0.5 * math.log2(c[k] / g), abs=1e-12)
    # equal sensitivities: everyone gets the target; 4x the sensitivity: one bit more
    assert set(A.allocate(dict.fromkeys(keys, 3.0), 2.5).values()) == {2.5}
    two = A.allocate({(0, "k"): 4.0, (0, "v"): 1.0}, 3.0)
    assert two[(0, "k")] - two[(0, "v")] == pytest.approx(1.0)


def test_allocate_clips_and_redistributes():
    keys = _keys(3)
    c = dict(zip(keys, [1e-12, 1.0, 1.0, 1.0, 1.0, 1e12], strict=True))
    r = A.allocate(c, 3.0, min_bits=2.0, max_bits=5.0)
    assert r[(0, "k")] == 2.0 and r[(2, "v")] == 5.0
    assert A.weighted_mean_bits(r) == pytest.approx(3.0, abs=1e-12)
    # what the clipped streams did not take is spread evenly over the four equal ones
    mid = [r[k] for k in keys[1:5]]
    assert max(mid) - min(mid) < 1e-12 and mid[0] == pytest.approx((18 - 7) / 4)
    # target at a bound: everything at the bound
    assert set(A.allocate(c, 2.0, min_bits=2.0, max_bits=5.0).values()) == {2.0}
    assert set(A.allocate(c, 5.0, min_bits=2.0, max_bits=5.0).values()) == {5.0}


def test_allocate_is_monotone_in_sensitivity():
    rng = np.random.default_rng(7)
    keys = _keys(10)
    c = {k: float(10 ** rng.uniform(-4, 4)) for k in keys}
    r = A.allocate(c, 3.0, min_bits=1.5, max_bits=6.0)
    order = sorted(keys, key=c.get)
    bits = [r[k] for k in order]
    assert all(a <= b + 1e-12 for a, b in zip(bits, bits[1:], strict=False))
    # raising one stream's c never lowers its bits, never raises anyone else's
    k0 = keys[3]
    r2 = A.allocate({**c, k0: c[k0] * 16}, 3.0, min_bits=1.5, max_bits=6.0)
    assert r2[k0] >= r[k0]
    assert all(r2[k] <= r[k] + 1e-12 for k in keys if k != k0)


def test_allocate_takes_a_measurement_dict_and_refuses_bad_input():
    doc = _doc(tiny().config)
    r = A.allocate(doc, 3.0, sizes=A.stream_sizes(tiny().config))
    assert A.weighted_mean_bits(r) == pytest.approx(3.0, abs=1e-12)
    c = {(0, "k"): 1.0, (0, "v"): 2.0}
    for bad, match in [({(0, "k"): 0.0, (0, "v"): 1.0}, "finite and > 0"),
                       ({(0, "k"): float("nan"), (0, "v"): 1.0}, "finite and > 0"),
                       ({(0, "x"): 1.0}, "'k' or 'v'"), ({}, "no streams")]:
        with pytest.raises(ValueError, match=match):
            A.allocate(bad, 3.0)
    with pytest.raises(ValueError, match="outside"):
        A.allocate(c, 9.0)
    with pytest.raises(ValueError, match="min_bits"):
        A.allocate(c, 3.0, min_bits=4.0, max_bits=2.0)
    with pytest.raises(ValueError, match="sizes lacks"):
        A.allocate(c, 3.0, sizes={(0, "k"): 1})
    with pytest.raises(ValueError, match="sizes must be"):
        A.allocate(c, 3.0, sizes={(0, "k"): 1, (0, "v"): -1})


def test_channel_weights_have_geometric_mean_one():
    rng = np.random.default_rng(0)
    m = rng.lognormal(0, 2, size=(3, 2, 8))
    for layer in range(3):
        w = A.channel_weights(m, layer)
        assert w.shape == (2, 8)
        assert float(np.exp(np.log(w).mean())) == pytest.approx(1.0)
        np.testing.assert_allclose(w / w[0, 0], m[layer] / m[layer, 0, 0])
    assert (A.channel_weights(np.zeros((1, 2, 4)), 0) == 1).all()
    m0 = m.copy()
    m0[0, 0, 0] = 0.0  # a zero moment is raised to eps x max, so the mean stays > 0
    assert np.isfinite(A.channel_weights(m0, 0)).all()
    with pytest.raises(ValueError, match="out of range"):
        A.channel_weights(m, 3)
    with pytest.raises(ValueError, match="n_layers"):
        A.channel_weights(m[0], 0)
    m0[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        A.channel_weights(m0, 1)


def test_spearman():
    assert A.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert A.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert A.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)


# ------------------------------------------------------------------ files


def _doc(config, floor: float = 1e-4) -> dict:
    """A valid allocation dict for `config` (synthetic numbers, no measurement)."""
    L = config.num_hidden_layers
    h, d = config.num_key_value_heads, config.head_dim
    rng = np.random.default_rng(1)
    rows = []
    for l in range(L):
        for s in A.STREAMS:
            dn = float(rng.normal(1e-3, 1e-3))
            dm = float(rng.normal(1e-3, 1e-3))
            e = 0.5 * (dn + dm)
            df = max(e, floor)
            rows.append({"layer": l, "stream": s, "dnll": dn, "dnll_mirror": dm, "estimate": e,
                         "dnll_floored": df, "bits": 3.25, "c": df * 2 ** 6.5,
                         "window_dnll": [dn, dn], "window_dnll_mirror": [dm, dm]})
    return {"format": A.FORMAT, "version": A.VERSION, "model": A._model_block(config),
            "calibration": {"corpus": "wiki", "windows": 2, "codec": "int3"},
            "reference_nll": 3.0, "floor": floor, "streams": rows,
            "query_moments": rng.lognormal(0, 1, size=(L, h, d))}


def _write(tmp_path, obj, name="a.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps(obj), encoding="utf-8")
    return str(p)


def _as_json(doc: dict) -> dict:
    out = json.loads(json.dumps({k: v for k, v in doc.items() if k != "query_moments"}))
    out["query_moments"] = np.asarray(doc["query_moments"]).tolist()
    return out


def test_save_load_round_trip(tmp_path):
    model = tiny()
    doc = _doc(model.config)
    p = A.save_allocation(tmp_path / "sub" / "alloc.json", doc)
    got = A.load_allocation(p, model.config)
    assert A.load_allocation(p, model)["model"] == got["model"]  # a model works too
    assert got["model"]["fingerprint"] == model_fingerprint(model.config)
    assert got["streams"] == doc["streams"]
    assert got["calibration"] == doc["calibration"]
    np.testing.assert_allclose(got["query_moments"], doc["query_moments"], rtol=1e-6)
    assert got["query_moments"].dtype == np.float64
    assert json.loads(p.read_text())["format"] == "eccokv-allocation"
    assert A.load_allocation(p)["version"] == 1  # without a config: no fingerprint check


def test_merge_pools_windows_and_refuses_mismatches(tmp_path):
    cfg = tiny().config
    a, b = _doc(cfg), _doc(cfg)
    a["calibration"] = {"starts": [1, 2], "estimator": "antithetic", "codec": "int3"}
    b["calibration"] = {"starts": [3, 4], "estimator": "antithetic", "codec": "int3"}
    b["query_moments"] = np.asarray(b["query_moments"]) * 3
    for r in b["streams"]:
        r["window_dnll"] = [x + 1e-3 for x in r["window_dnll"]]
        r["dnll"] += 1e-3
        r["estimate"] = 0.5 * (r["dnll"] + r["dnll_mirror"])
        r["dnll_floored"] = max(r["estimate"], b["floor"])
        r["c"] = r["dnll_floored"] * 2 ** 6.5
    m = A.merge_allocations(a, b)
    assert m["calibration"]["windows"] == 4 and m["calibration"]["starts"] == [1, 2, 3, 4]
    np.testing.assert_allclose(m["query_moments"], 2 * np.asarray(a["query_moments"]))
    for ra, rb, rm in zip(a["streams"], b["streams"], m["streams"], strict=True):
        assert rm["dnll"] == pytest.approx(0.5 * (ra["dnll"] + rb["dnll"]))
        assert len(rm["window_dnll"]) == len(rm["window_dnll_mirror"]) == 4
    A.save_allocation(tmp_path / "m.json", m)
    assert A.load_allocation(tmp_path / "m.json")["calibration"]["windows"] == 4
    with pytest.raises(ValueError, match="share calibration windows"):
        A.merge_allocations(a, a)
    with pytest.raises(ValueError, match="different calibration codec"):
        A.merge_allocations(a, {**b, "calibration": {**b["calibration"], "codec": "int2"}})
    with pytest.raises(ValueError, match="different models"):
        A.merge_allocations(a, _doc(tiny(layers=3).config))
    with pytest.raises(ValueError, match="two or more"):
        A.merge_allocations(a)


def _mutations(doc: dict) -> list[tuple[str, object, str]]:
    """(description, mutated JSON object, expected message fragment)."""
    j = _as_json(doc)
    cases = []

    def case(desc, fn, match):
        m = json.loads(json.dumps(j))
        fn(m)
        cases.append((desc, m, match))

    case("version 2", lambda m: m.update(version=2), "version 2 is not supported")
    case("version true", lambda m: m.update(version=True), "version")
    case("version string", lambda m: m.update(version="1"), "version")
    case("format", lambda m: m.update(format="eccokv-cache"), "format")
    case("missing field", lambda m: m.pop("floor"), "missing fields")
    case("unknown field", lambda m: m.update(path="/etc/passwd"), "unknown fields")
    case("top-level list", lambda m: m.clear(), "missing fields")
    case("moments shape", lambda m: m["query_moments"].pop(), "query_moments must be")
    case("moments ragged", lambda m: m["query_moments"][0][0].pop(), "query_moments must be")
    case("moments string", lambda m: m["query_moments"][0][0].__setitem__(0, "1"),
         "query_moments must")
    case("moments bool", lambda m: m["query_moments"][0][0].__setitem__(0, True),
         "numbers only")
    case("moments negative", lambda m: m["query_moments"][0][0].__setitem__(0, -1.0),
         "negative")
    case("moments huge", lambda m: m["query_moments"][0][0].__setitem__(0, 1e400),
         "constant Infinity")
    case("stream missing", lambda m: m["streams"].pop(), "lacks 1 of the")
    case("stream twice", lambda m: m["streams"].__setitem__(1, dict(m["streams"][0])), "twice")
    case("stream kind", lambda m: m["streams"][0].update(stream="q"), "'k' or 'v'")
    case("stream layer", lambda m: m["streams"][0].update(layer=99), "out of range")
    case("stream layer float", lambda m: m["streams"][0].update(layer=0.0), "integer")
    case("stream c string", lambda m: m["streams"][0].update(c="1"), "must be a number")
    case("stream c wrong", lambda m: m["streams"][0].update(c=m["streams"][0]["c"] * 2),
         "dnll_floored x 2")
    case("stream bits zero", lambda m: m["streams"][0].update(bits=0), "bits must be > 0")
    case("floored below floor", lambda m: m["streams"][0].update(dnll_floored=0.0),
         "dnll_floored must be >=")
    case("floor zero", lambda m: m.update(floor=0.0), "floor must be > 0")
    case("stream extra field", lambda m: m["streams"][0].update(file="x"), "fields")
    case("estimate wrong", lambda m: m["streams"][0].update(estimate=1.0), "estimate")

    def plain_with_mirror_list(m):  # a plain row (no mirror) that still lists mirror windows
        r = m["streams"][0]
        r.update(dnll_mirror=None, estimate=r["dnll"])
        r.update(dnll_floored=max(r["dnll"], m["floor"]))
        r.update(c=r["dnll_floored"] * 2 ** (2 * r["bits"]))

    case("mirror windows without mirror", plain_with_mirror_list, "must be null")
    case("window_dnll empty", lambda m: m["streams"][0].update(window_dnll=[]), "non-empty")
    case("fingerprint", lambda m: m["model"].update(fingerprint="../../x"), "32 lower-case")
    case("n_layers", lambda m: m["model"].update(n_layers=0), "n_layers must be >= 1")
    case("calibration", lambda m: m.update(calibration=[1]), "calibration must be an object")
    return cases


def test_every_validation_error_is_named(tmp_path):
    model = tiny()
    doc = _doc(model.config)
    cases = _mutations(doc)
    for i, (desc, obj, match) in enumerate(cases):
        p = _write(tmp_path, obj, f"m{i}.json")
        with pytest.raises(A.AllocationFileError, match=match):
            A.load_allocation(p)
        assert issubclass(A.AllocationFileError, ValueError), desc


def test_non_finite_numbers_are_refused(tmp_path):
    model = tiny()
    doc = _doc(model.config)
    j = _as_json(doc)
    text = json.dumps(j).replace(f'"reference_nll": {j["reference_nll"]}',
                                 '"reference_nll": NaN', 1)
    assert "NaN" in text
    p = tmp_path / "nan.json"
    p.write_text(text)
    with pytest.raises(A.AllocationFileError, match="NaN"):
        A.load_allocation(p)
    # a literal that overflows to inf is no constant: the finiteness checks catch it
    text = json.dumps(j)
    for old, new, match in ((f'"reference_nll": {j["reference_nll"]}', '"reference_nll": -1e999',
                             "reference_nll is not finite"),
                            (r'("query_moments": \[\[\[)[^,\]]+', r"\g<1>1e400",
                             "query_moments holds NaN or Inf")):
        bad = re.sub(old, new, text, count=1) if old.startswith("(") else text.replace(old, new)
        assert bad != text
        p.write_text(bad)
        with pytest.raises(A.AllocationFileError, match=match):
            A.load_allocation(p)
    q = np.array(doc["query_moments"])
    q[1, 0, 3] = np.nan
    with pytest.raises(A.AllocationFileError, match="NaN or Inf"):
        A.save_allocation(tmp_path / "x.json", {**doc, "query_moments": q})
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(A.AllocationFileError, match="not finite"):
        A.save_allocation(tmp_path / "x.json", {**doc, "reference_nll": math.inf})
    cal = {**doc, "calibration": {"seconds": math.nan}}
    with pytest.raises(A.AllocationFileError, match="finite numbers"):
        A.save_allocation(tmp_path / "x.json", cal)


def test_wrong_model_and_wrong_shapes_are_refused(tmp_path):
    model = tiny()
    p = A.save_allocation(tmp_path / "a.json", _doc(model.config))
    other = tiny(layers=3)
    with pytest.raises(A.AllocationFileError, match="another model"):
        A.load_allocation(p, other.config)
    with pytest.raises(A.AllocationFileError, match="another model"):
        A.load_allocation(p, tiny(family="qwen2").config)
    # same fingerprint-relevant fields lied about in the file: shapes checked on their own
    j = json.loads(p.read_text())
    j["model"]["head_dim"] = 8
    with pytest.raises(A.AllocationFileError, match="query_moments must be"):
        A.load_allocation(_write(tmp_path, j, "b.json"))


def test_garbage_and_oversized_files(tmp_path, monkeypatch):
    for i, blob in enumerate([b"", b"{", b"\xff\xfe", b"[1, 2]", b"null", b'"x"']):
        p = tmp_path / f"g{i}.json"
        p.write_bytes(blob)
        with pytest.raises(A.AllocationFileError):
            A.load_allocation(p)
    p = A.save_allocation(tmp_path / "a.json", _doc(tiny().config))
    monkeypatch.setattr(A, "MAX_FILE_BYTES", 100)
    with pytest.raises(A.AllocationFileError, match="more than the 100 allowed"):
        A.load_allocation(p)


def test_the_packaged_smollm2_allocation_is_valid():
    d = A.packaged_allocation("smollm2")
    assert d["model"]["name"] == "smollm2" and d["model"]["n_layers"] == 30
    assert d["query_moments"].shape == (30, 3, 64)
    assert d["calibration"]["estimator"] == "antithetic"
    r = A.allocate(d, 3.0)
    assert A.weighted_mean_bits(r) == pytest.approx(3.0, abs=1e-12)
    with pytest.raises(ValueError, match="bad packaged"):
        A.packaged_allocation("../x")
    with pytest.raises(FileNotFoundError):
        A.packaged_allocation("nosuchmodel")
    with pytest.raises(A.AllocationFileError, match="another model"):
        A.packaged_allocation("smollm2", tiny().config)


# ------------------------------------------------------------------ calibration runs

needs_text = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None,
    reason="real text comes from the gensim package (pip install 'eccokv[hf]')")


@needs_text
def test_calibration_windows_avoid_the_evaluation_windows():
    from eccokv import data

    tok = CharTok()
    wins, where = A.calibration_windows(tok, "news", window=164, n=3, seed=0)
    assert wins.shape == (3, 164)
    stream = data.corpus_tokens(tok, "news").numpy()
    for w, n, s in A.EVAL_WINDOWS:
        ev = data.token_windows(tok, "news", window=w, n=n, seed=s).numpy()
        for a in A._window_starts(stream, ev):
            assert all(b + 164 <= a or a + w <= b for b in where["starts"])
    # the same seed gives the same windows; another seed other windows
    again, _ = A.calibration_windows(tok, "news", window=164, n=3, seed=0)
    assert torch.equal(wins, again)
    other, _ = A.calibration_windows(tok, "news", window=164, n=3, seed=1)
    assert not torch.equal(wins, other)
    # when the first seed's windows hit an evaluation window, the next seed is taken
    ev = data.token_windows(tok, "news", window=164, n=3, seed=A.WINDOW_SEED_BASE)
    _, where2 = A.calibration_windows(tok, "news", window=164, n=3, seed=0,
                                      avoid=[(164, 3, A.WINDOW_SEED_BASE)])
    assert where2["window_seed"] > A.WINDOW_SEED_BASE
    assert not set(where2["starts"]) & set(A._window_starts(stream, ev.numpy()))


@needs_text
def test_sensitivity_of_an_exact_codec_is_zero_and_of_a_lossy_one_is_not():
    model = tiny()
    tok = CharTok()
    kw = dict(corpus="news", windows=2, context=132, score=16)
    exact = A.measure_sensitivity(model, tok, codec="none", **kw)
    assert len(exact["streams"]) == 4
    assert all(r["dnll"] == 0.0 and r["dnll_mirror"] == 0.0 for r in exact["streams"])
    assert all(r["bits"] > 32 for r in exact["streams"])  # float32 + chunk metadata
    lossy = A.measure_sensitivity(model, tok, codec="int2", **kw)
    assert any(r["dnll"] != 0.0 for r in lossy["streams"])
    assert lossy["reference_window_nll"] == exact["reference_window_nll"]
    for r in lossy["streams"]:
        assert len(r["window_dnll"]) == len(r["window_dnll_mirror"]) == 2
        assert r["dnll"] == pytest.approx(np.mean(r["window_dnll"]))
        assert r["dnll_mirror"] == pytest.approx(np.mean(r["window_dnll_mirror"]))
        assert r["estimate"] == pytest.approx(0.5 * (r["dnll"] + r["dnll_mirror"]))
        assert r["dnll_floored"] == max(r["estimate"], lossy["floor"])
        assert r["c"] == pytest.approx(r["dnll_floored"] * 2 ** (2 * r["bits"]))
        assert 2.0 < r["bits"] < 3.0  # int2 g128: 2 bits + scales + chunk metadata
    assert lossy["settings"]["codec"] == "int2"
    assert model.config._attn_implementation == "sdpa"  # fused=False: never switched
    plain = A.measure_sensitivity(model, tok, codec="int2", estimator="plain", **kw)
    for p, r in zip(plain["streams"], lossy["streams"], strict=True):
        assert p["dnll"] == r["dnll"] and p["estimate"] == p["dnll"]
        assert p["dnll_mirror"] is None and p["window_dnll_mirror"] is None
    with pytest.raises(ValueError, match="estimator"):
        A.measure_sensitivity(model, tok, codec="int2", estimator="mean", **kw)


@needs_text
def test_sensitivity_matches_a_direct_computation_through_dynamic_cache():
    """Layer 0's K through int2 (tokens 4..131 in one group of 128 per channel, the 4 sink
    tokens exact), and its mirror 2K - K_hat, scored through a DynamicCache by hand."""
    from transformers import DynamicCache

    import eccokv.codecs as C

    model = tiny()
    tok = CharTok()
    ctx, score = 132, 16
    res = A.measure_sensitivity(model, tok, "news", windows=1, context=ctx, score=score,
                                codec="int2")
    wins, _ = A.calibration_windows(tok, "news", ctx + score, 1, 0)
    ids = wins[:1]
    codec = C.get("int2")

    def nll(change):
        with torch.no_grad():
            pre = DynamicCache(config=model.config)
            out = model(ids[:, :ctx], past_key_values=pre, use_cache=True)
            kv = [(lay.keys.clone(), lay.values.clone()) for lay in pre.layers]
            k = kv[0][0]
            k_hat = k.clone()
            k_hat[0, :, 4:] = codec.decode(codec.encode(k[0, :, 4:], axis=1))
            kv[0] = (change(k, k_hat), kv[0][1])
            cache = DynamicCache(config=model.config)
            for i, (kk, vv) in enumerate(kv):
                cache.update(kk, vv, i)
            logits = model(ids[:, ctx:], past_key_values=cache).logits[0]
            logits = torch.cat([out.logits[0, -1:], logits[:-1]])
            return float(torch.nn.functional.cross_entropy(logits, ids[0, ctx:]))

    ref = nll(lambda k, k_hat: k)
    row = next(r for r in res["streams"] if (r["layer"], r["stream"]) == (0, "k"))
    assert res["reference_nll"] == pytest.approx(ref, abs=1e-6)
    assert row["dnll"] == pytest.approx(nll(lambda k, k_hat: k_hat) - ref, abs=1e-6)
    assert row["dnll_mirror"] == pytest.approx(nll(lambda k, k_hat: 2 * k - k_hat) - ref,
                                               abs=1e-6)
    assert abs(row["dnll"]) > 1e-5 and abs(row["dnll_mirror"]) > 1e-5  # not vacuous


@needs_text
def test_query_moments_are_post_rope_and_averaged_over_each_kv_group():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny(heads=4, kv_heads=2)
    before = model.config._attn_implementation
    ids = torch.randint(3, V, (2, 40), generator=torch.Generator().manual_seed(0))
    m = A.measure_query_moments(model, CharTok(), wins=ids)
    assert m.shape == (2, 2, 16)
    assert model.config._attn_implementation == before
    # layer 0 by hand: q_proj of the normed embeddings, RoPE, mean of q^2
    with torch.no_grad():
        want = np.zeros((2, 16))
        for b in range(2):
            x = ids[b:b + 1]
            h = model.model.embed_tokens(x)
            pos = torch.arange(x.shape[1])[None]
            cos, sin = model.model.rotary_emb(h, pos)
            attn = model.model.layers[0].self_attn
            q = attn.q_proj(model.model.layers[0].input_layernorm(h))
            q = q.view(1, x.shape[1], 4, 16).transpose(1, 2)
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            want += q.double().square().mean(dim=2)[0].reshape(2, 2, 16).mean(1).numpy()
    np.testing.assert_allclose(m[0], want / 2, rtol=1e-5)
    # the model's output is unchanged by the capture (it calls sdpa)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


@needs_text
def test_run_calibration_writes_a_valid_file(tmp_path):
    model = tiny(layers=3)
    out = tmp_path / "alloc.json"
    data = A.run_calibration(model=model, tokenizer=CharTok(), out=out, corpus="news",
                             windows=1, context=132, score=16, codec="int3")
    got = A.load_allocation(out, model.config)
    assert got["query_moments"].shape == (3, 2, 16)
    assert (got["query_moments"] > 0).all()
    assert len(got["streams"]) == 6
    assert got["calibration"]["codec"] == "int3" and got["calibration"]["context"] == 132
    np.testing.assert_allclose(got["query_moments"], data["query_moments"], rtol=1e-6)
    r = A.allocate(got, 3.0, sizes=A.stream_sizes(model.config))
    assert A.weighted_mean_bits(r) == pytest.approx(3.0, abs=1e-12)
    assert "| 2 |" in A.to_markdown(got)


def test_cli_options(monkeypatch, tmp_path, capsys):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")  # as the `calibrate` parser has them
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    A.add_cli(p)
    args = p.parse_args(["--sensitivity", "--out", str(tmp_path / "a.json"),
                         "--sensitivity-codec", "ecco3", "--sensitivity-windows", "3",
                         "--seed", "2", "--json"])
    assert args.sensitivity and args.sensitivity_codec == "ecco3"
    fresh = A.add_cli(argparse.ArgumentParser()).parse_args(["--out", "x.json"])
    assert not fresh.sensitivity and fresh.model == "smollm2"
    assert fresh.sensitivity_context == A.DEFAULT_CONTEXT
    seen = {}
    doc = _doc(tiny().config)
    doc["calibration"]["total_seconds"] = 1.0

    def fake(model_name, **kw):
        seen.update(kw, model_name=model_name)
        return doc

    monkeypatch.setattr(A, "run_calibration", fake)
    assert A.run_cli(args) == 0
    assert seen["codec"] == "ecco3" and seen["windows"] == 3 and seen["seed"] == 2
    assert json.loads(capsys.readouterr().out)["format"] == "eccokv-allocation"
