"""EccoCache with the variable-rate codec: target_bits= / bound= / row_scale, the achieved
rate in memory_report(), the bound on the cached values, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eccokv.hf.cache import EccoCache, EccoLayer
from eccokv.hf.spec import LayerSpec, stream
from test_cache import _ids, _steps, tiny


def _compressed_bits(cache: EccoCache) -> float:
    bits = vals = 0
    for layer in cache.layers:
        if isinstance(layer, EccoLayer):
            for part in ("key", "value"):
                r = layer.memory_report()[part]
                bits += 8 * r["compressed_bytes"]
            for s in (layer.k, layer.v):
                for ch in s.chunks:
                    vals += sum(c.numel for c in ch)
    return bits / max(vals, 1)


@pytest.mark.parametrize("target", [2.5, 3.0, 4.0])
def test_target_bits_cache_reaches_its_rate(target):
    model, cfg = tiny("llama", heads=4, kv_heads=2, head_dim=64)
    cache = EccoCache(cfg, target_bits=target, residual_length=0)
    _steps(model, cache, _ids(1, 512, seed=1), 512)
    rep = cache.memory_report()
    for layer in rep["layers"]:
        for part in ("key", "value"):
            assert layer[part]["compressed_tokens"] > 0
            assert {"compressed_bytes", "metadata_bytes"} <= set(layer[part])
            assert layer[part]["codec"]["target_bits"] == target
    assert abs(_compressed_bits(cache) - target) <= 0.02 * target


def test_bound_mode_keeps_the_bound_on_cached_values():
    model, cfg = tiny("llama", heads=4, kv_heads=2, head_dim=64)
    cache = EccoCache(cfg, bound=0.05, residual_length=0, sink_tokens=0, fused=False)
    ids = _ids(1, 300, seed=2)
    with torch.no_grad():
        ref = model(ids, use_cache=True).past_key_values
        model(ids, past_key_values=cache)
    for i, layer in enumerate(cache.layers):
        for s, full in ((layer.k, ref.layers[i].keys), (layer.v, ref.layers[i].values)):
            got = torch.cat([s.spec.codec.decode(ch[0]) for ch in s.chunks], dim=1)
            x = full[0, :, :got.shape[1]].float()
            g = x.reshape(x.shape[0], -1, 128, x.shape[-1])
            rng = (g.amax(2) - g.amin(2)).repeat_interleave(128, 1)
            assert bool(((got - x).abs() <= 0.05 * rng + 1e-12).all())


def test_rate_and_bound_arguments_are_checked():
    _, cfg = tiny("llama")
    with pytest.raises(ValueError, match="not both"):
        EccoCache(cfg, target_bits=3.0, bound=0.05)
    with pytest.raises(ValueError, match="do not also give"):
        EccoCache(cfg, "int4", target_bits=3.0)
    with pytest.raises(ValueError, match="target_bits"):
        EccoCache(cfg, target_bits=0.5)
    with pytest.raises(ValueError, match="bound_mode"):
        EccoCache(cfg, bound_mode="absolute")
    c = EccoCache(cfg, bound=0.2, bound_mode="absolute")
    assert c.layers[0].spec.key.codec.get_config()["bound_mode"] == "absolute"


def test_row_scale_spends_bits_where_asked_and_survives_save_load(tmp_path):
    model, cfg = tiny("llama", heads=4, kv_heads=2, head_dim=64)
    H, D = 2, 64
    rs = np.ones(H * D)
    rs[:D] = 0.25  # head 0's channels: 4x tighter bound
    spec = LayerSpec(stream({"id": "ecco-eb", "target_bits": 3.0}, "tokens", row_scale=rs),
                     stream({"id": "ecco-eb", "target_bits": 3.0}, "tokens"))
    cache = EccoCache(cfg, layers={0: spec, 1: spec}, residual_length=0)
    ids = _ids(1, 256, seed=3)
    with torch.no_grad():
        ref = model(ids, use_cache=True).past_key_values
        model(ids, past_key_values=cache)
    k = cache.layers[0].k
    got = k.spec.codec.decode(k.chunks[0][0])
    s0 = k.sink_len
    x = ref.layers[0].keys[0, :, s0:s0 + got.shape[1]].float()
    e0 = float(((got[0] - x[0]) ** 2).mean() / x[0].var())
    e1 = float(((got[1] - x[1]) ** 2).mean() / x[1].var())
    assert e0 < e1
    path = tmp_path / "c.eccokv"
    cache.save(path, ids)
    back = EccoCache.load(path, cfg)
    assert np.array_equal(back.layers[0].spec.key.row_scale, k.spec.row_scale)
    with pytest.raises(ValueError, match="row_scale"):
        stream({"id": "ecco-eb", "target_bits": 3.0}, "tokens", row_scale=-rs)
    with pytest.raises(ValueError, match="row_scale"):
        stream("ecco4", "tokens", row_scale=rs)


def test_generate_with_target_bits_cache():
    model, cfg = tiny("qwen2", heads=4, kv_heads=2, head_dim=32)
    ids = _ids(1, 200, seed=4)
    cache = EccoCache(cfg, target_bits=3.0, residual_length=32)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=20, do_sample=False)
    assert out.shape[1] == 220
    assert cache.memory_report()["layers"][0]["key"]["compressed_tokens"] > 0
