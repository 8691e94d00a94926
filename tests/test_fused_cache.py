"""EccoCache + fused attention inside transformers: same logits as decoding the cache,
the fused kernels really run, and full K/V are never built."""

from __future__ import annotations

import pytest
import torch

import eccokv.kernels.attention as KA
from eccokv.hf.cache import EccoCache, EccoLayer
from test_cache import FAMILIES, _ids, _steps, tiny


def _run(model, cfg, ids, mask, fused, name, **kw):
    cache = EccoCache(cfg, name, fused=fused, **kw)
    if not fused:
        cfg._attn_implementation = "sdpa"
    out = _steps(model, cache, ids, 150, mask)
    with torch.no_grad():  # a multi-token step against the compressed cache (q_len > 1)
        m = None if mask is None else torch.cat([mask, torch.ones(ids.shape[0], 5,
                                                                   dtype=mask.dtype)], 1)
        out2 = model(ids[:, :5], attention_mask=m, past_key_values=cache).logits
    return torch.cat([out, out2], 1), cache


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", ["ecco4", "kivi2", "int4", "eb3"])
def test_fused_equals_decoded_attention(family, name, monkeypatch):
    model, cfg = tiny(family, heads=6, kv_heads=2, head_dim=32)
    ids = _ids(2, 170, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :11] = 0  # left padding
    calls = []
    real = KA.fused_attention
    monkeypatch.setattr(KA, "fused_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref, _ = _run(model, cfg, ids, mask, False, name, residual_length=16)
    assert not calls
    got, cache = _run(model, cfg, ids, mask, True, name, residual_length=16)
    assert calls  # the fused kernels ran
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 1e-4, err
    assert cfg._attn_implementation == "eccokv"
    assert any(isinstance(x, EccoLayer) and x.k.chunks for x in cache.layers)


def test_fused_steps_never_build_full_kv():
    model, cfg = tiny("llama")
    cache = EccoCache(cfg, "ecco4", residual_length=8)
    seen = []
    for layer in cache.layers:
        def wrapped(k, v, *a, _orig=layer.update, **kw):
            out = _orig(k, v, *a, **kw)
            seen.append((k.shape[2], out[0].shape[2], hasattr(out[0], "_eccokv")))
            return out
        layer.update = wrapped
    out = model.generate(_ids(1, 200), max_new_tokens=6, do_sample=False, past_key_values=cache,
                         pad_token_id=0)
    assert out.shape == (1, 206)
    decode_steps = [s for s in seen if s[0] == 1]
    assert decode_steps and all(n == 1 and tagged for _, n, tagged in decode_steps)


def test_fused_beam_search_and_fallback_warning(monkeypatch):
    model, cfg = tiny("qwen2", head_dim=32)
    calls = []
    real = KA.fused_attention
    monkeypatch.setattr(KA, "fused_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = _ids(2, 180, seed=6)
    out = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0,
                         past_key_values=EccoCache(cfg, "kivi4", residual_length=8))
    assert out.shape == (2, 185) and calls
    # Ecco grouped over channels has no fused kernel: decoded instead, with a warning
    cache = EccoCache(cfg, "ecco4", value_codec=("ecco4", "channels"), residual_length=8)
    with pytest.warns(UserWarning, match="no fused attention"):
        import eccokv.hf.attention as A

        A._warned.clear()
        _steps(model, cache, ids, 178)


def test_plain_cache_after_eccocache_still_exact():
    """The "eccokv" attention hands untagged K/V to the previous implementation."""
    from transformers import DynamicCache

    model, cfg = tiny("llama")
    ids = _ids(1, 40)
    cfg._attn_implementation = "sdpa"
    ref = _steps(model, DynamicCache(config=cfg), ids, 30)
    EccoCache(cfg, "ecco4")  # switches the config to "eccokv"
    assert cfg._attn_implementation == "eccokv"
    got = _steps(model, DynamicCache(config=cfg), ids, 30)
    assert torch.equal(ref, got)


def test_long_steps_decode_once_instead_of_fusing(monkeypatch):
    model, cfg = tiny("llama", head_dim=32)
    ids = _ids(1, 240, seed=7)
    calls = []
    real = KA.fused_attention
    monkeypatch.setattr(KA, "fused_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = EccoCache(cfg, "ecco4", residual_length=8)
    with torch.no_grad():
        model(ids[:, :150], past_key_values=cache)
        model(ids[:, 150:190], past_key_values=cache)  # 40 new tokens: decoded path
        assert not calls
        model(ids[:, 190:191], past_key_values=cache)  # one token: fused
        assert calls


@pytest.mark.parametrize("residual,sink", [(0, 0), (0, 4), (100, 1)])
def test_fused_equals_decoded_for_residual_and_sink_lengths(residual, sink):
    model, cfg = tiny("llama", heads=8, kv_heads=2, head_dim=32, layers=1)
    ids = _ids(3, 170, seed=8)
    mask = torch.ones_like(ids)
    mask[2, :20] = 0
    ref, _ = _run(model, cfg, ids, mask, False, "ecco4", residual_length=residual,
                  sink_tokens=sink)
    got, _ = _run(model, cfg, ids, mask, True, "ecco4", residual_length=residual,
                  sink_tokens=sink)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-4
