"""EccoCache never gives plausible wrong output and leaves no trace it should not:

- a fused step whose tagged K/V the model replaced before attention is an error;
- the user's config writes the same config.json after an EccoCache generate();
- a rejected update leaves the cache exactly as it was.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from transformers import DynamicCache

import eccokv.hf.attention as A
from eccokv.hf.cache import EccoCache, EccoLayer
from test_cache import _ids, _steps, tiny

# ------------------------------------------------------------------ lost tags are loud


def _tamper(cache: EccoCache, fn) -> None:
    """Make every EccoLayer's update hand `fn(keys, values)` to the attention, as a model
    that touches key_states/value_states between the cache update and attention would."""
    for layer in cache.layers:
        if isinstance(layer, EccoLayer):
            def wrapped(k, v, *a, _orig=layer.update, **kw):
                return fn(*_orig(k, v, *a, **kw))
            layer.update = wrapped


def _mul(k, v):
    return k * 1.0, v


def _to(k, v):
    return k.to(torch.float64).to(k.dtype), v.to(torch.float64).to(v.dtype)


def _value_only(k, v):
    return k, v.clone()


def _in_place(k, v):
    return k.mul_(1.0), v


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
@pytest.mark.parametrize("fn", [_mul, _to, _value_only, _in_place])
def test_lost_tag_raises(family, fn):
    model, cfg = tiny(family, head_dim=32)
    ids = _ids(1, 150, seed=1)
    cache = EccoCache(cfg, "ecco4", residual_length=8)
    with torch.no_grad():
        model(ids[:, :140], past_key_values=cache)  # prefill: nothing fused yet
        _tamper(cache, fn)
        with pytest.raises(RuntimeError, match="issued a fused attention step"):
            model(ids[:, 140:141], past_key_values=cache)


def test_tag_of_another_step_raises():
    model, cfg = tiny("llama", head_dim=32)
    ids = _ids(1, 150, seed=2)
    cache = EccoCache(cfg, "ecco4", residual_length=8)
    stash: dict[int, tuple] = {}

    def stale(k, v):  # hands every layer the K/V of the first layer's step
        return stash.setdefault(0, (k, v))

    with torch.no_grad():
        model(ids[:, :140], past_key_values=cache)
        _tamper(cache, stale)
        with pytest.raises(RuntimeError, match="tag of another step"):
            model(ids[:, 140:141], past_key_values=cache)


def test_untouched_models_and_other_caches_are_unaffected():
    """Plain caches, sliding layers left to transformers and fused steps all still run."""
    model, cfg = tiny("gemma3", layers=4, head_dim=32)  # sliding + full layers
    ids = _ids(1, 150, seed=3)
    cfg._attn_implementation = "sdpa"
    ref = _steps(model, DynamicCache(config=cfg), ids, 140)
    cache = EccoCache(cfg, "ecco4", residual_length=8)
    got = _steps(model, cache, ids, 140)
    assert torch.isfinite(got).all()
    # a plain cache afterwards, on the same (switched) config: bit for bit as before
    assert torch.equal(_steps(model, DynamicCache(config=cfg), ids, 140), ref)
    assert A._local.pending is None  # every issued step was attended to


def test_eager_model_keeps_eager_attention_and_masks():
    model, cfg = tiny("llama", head_dim=32, attn_implementation="eager")
    assert cfg._attn_implementation == "eager"
    ids = _ids(2, 150, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ref = _steps(model, DynamicCache(config=cfg), ids, 140, mask)
    dec = _steps(model, EccoCache(cfg, "ecco4", residual_length=8, fused=False), ids, 140,
                 mask)
    fused = _steps(model, EccoCache(cfg, "ecco4", residual_length=8), ids, 140, mask)
    assert cfg._attn_implementation == "eccokv"
    assert A.base_implementation(cfg) == "eager"
    assert torch.equal(_steps(model, DynamicCache(config=cfg), ids, 140, mask), ref)
    assert (fused - dec).abs().max() / dec.abs().max() < 1e-4


# ------------------------------------------------------------------ the config stays clean


def test_config_json_unchanged_by_eccocache(tmp_path):
    model, cfg = tiny("llama")
    model.save_pretrained(tmp_path / "before")
    out = model.generate(_ids(1, 150), max_new_tokens=4, do_sample=False, pad_token_id=0,
                         past_key_values=EccoCache(cfg, "ecco4", residual_length=8))
    assert out.shape == (1, 154) and cfg._attn_implementation == "eccokv"
    model.save_pretrained(tmp_path / "after")
    before, after = (json.loads((tmp_path / d / "config.json").read_text())
                     for d in ("before", "after"))
    assert before == after
    assert "eccokv" not in cfg.to_json_string() and "eccokv" not in json.dumps(cfg.to_dict())
    # copies of the config keep the implementation "eccokv" replaced
    for c in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert c._attn_implementation == "eccokv" and A.base_implementation(c) == "sdpa"


# ------------------------------------------------------------------ failed updates change nothing


def _state(cache: EccoCache):
    out = []
    for layer in cache.layers:
        if isinstance(layer, EccoLayer):
            for s in (layer.k, layer.v):
                out.append((s.held, list(map(id, sum(s.chunks, []))), list(s.valid),
                            s.sink_len, s.compressed_len))
            out.append((layer.seq, layer.keys, layer.values))
    return out


def _same(a, b) -> bool:
    return all(x is y or x == y for sa, sb in zip(a, b, strict=True)
               for x, y in zip(sa, sb, strict=True))


@pytest.mark.parametrize("fused", [True, False])
def test_rejected_update_leaves_the_cache_as_it_was(fused):
    model, cfg = tiny("qwen2", head_dim=32)
    ids = _ids(1, 150, seed=5)
    good, bad = (EccoCache(cfg, "ecco4", residual_length=8, fused=fused) for _ in range(2))
    with torch.no_grad():
        for c in (good, bad):
            model(ids[:, :145], past_key_values=c)
        k = torch.randn(1, 2, 1, 32)
        before = _state(bad)
        nan = k.clone()
        nan[0, 1, 0, 3] = float("nan")
        rejects = [(nan, k, ValueError, "NaN"), (k, k * float("inf"), ValueError, "NaN"),
                   (k.double(), k.double(), ValueError, "float32"),
                   (k.half(), k.half(), ValueError, "dtype"),
                   (torch.randn(1, 3, 1, 32), torch.randn(1, 3, 1, 32), ValueError, "heads"),
                   (torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32), ValueError, "batch")]
        for kk, vv, err, match in rejects:
            with pytest.raises(err, match=match):
                bad.update(kk, vv, 1)
            assert _same(_state(bad), before)
        assert A._local.pending is None
        for t in range(145, 150):  # crosses no group boundary, then one that compresses
            a = model(ids[:, t:t + 1], past_key_values=good).logits
            b = model(ids[:, t:t + 1], past_key_values=bad).logits
            assert torch.equal(a, b)


def test_failed_compression_leaves_the_layer_as_it_was(monkeypatch):
    layer = EccoLayer(residual_length=8, sink_tokens=2)
    g = torch.Generator().manual_seed(0)
    kv = [torch.randn(1, 2, s, 16, generator=g) for s in (100, 40)]
    layer.update(kv[0], kv[0])
    held, seq = layer.k.held, layer.seq
    codec = layer.spec.value.codec

    def boom(*a, **k):
        raise RuntimeError("codec failure")

    monkeypatch.setattr(codec, "encode", boom)
    with pytest.raises(RuntimeError, match="codec failure"):
        layer.update(kv[1], kv[1])  # 140 tokens: the first group is compressed here
    assert layer.k.held is held and layer.seq == seq and not layer.k.chunks
    monkeypatch.undo()
    layer.update(kv[1], kv[1])
    assert layer.k.compressed_len == layer.v.compressed_len == 128 and layer.seq == 140


def test_fused_false_holds_after_a_fused_cache_switched_the_config(monkeypatch):
    """EccoCache(fused=False) never runs the fused kernels, even when an earlier fused
    cache already switched the model's attention to eccokv's; its logits are those of the
    decode path."""
    import eccokv.kernels.attention as KA

    model, cfg = tiny("llama", head_dim=32)
    ids = _ids(1, 150, seed=5)
    _steps(model, EccoCache(cfg, "ecco4", residual_length=8), ids[:, :145], 140)  # fused
    calls = []
    real = KA.fused_attention
    monkeypatch.setattr(KA, "fused_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = _steps(model, EccoCache(cfg, "ecco4", residual_length=8, fused=False), ids, 140)
    assert not calls
    fused = _steps(model, EccoCache(cfg, "ecco4", residual_length=8), ids, 140)
    assert calls  # the same model still runs fused for a fused cache
    assert torch.allclose(plain, fused, atol=1e-4, rtol=1e-4)


def test_deepcopy_of_a_prompt_cache_continues_like_the_original():
    """copy.deepcopy(cache), transformers' idiom for reusing a prompt cache, works and the
    copy continues exactly like the original (codecs are shared, chunks copied)."""
    model, cfg = tiny("llama", head_dim=32)
    ids = _ids(1, 150, seed=6)
    cache = EccoCache(cfg, "ecco4", residual_length=8)
    with torch.no_grad():
        model(ids[:, :140], past_key_values=cache)
        twin = copy.deepcopy(cache)
        a = model(ids[:, 140:145], past_key_values=cache).logits
        b = model(ids[:, 140:145], past_key_values=twin).logits
    assert torch.equal(a, b) and twin.get_seq_length() == cache.get_seq_length() == 145
