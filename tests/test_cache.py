"""EccoCache on tiny random transformers models of five families, and EccoLayer semantics.

- codec "none": logits identical to DynamicCache (prefill, decode steps, batch with padding,
  beam search, crop, select, repeat);
- lossy codecs: the K/V a step attends to are exactly decode(encode(.)) of the same tensors
  for the compressed part and the exact tensors for the rest;
- residual-window edges, memory accounting, argument errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T
from transformers import DynamicCache

import eccokv
import eccokv.codecs as C
from eccokv.hf.cache import EccoCache, EccoLayer
from eccokv.hf.spec import layer_spec

F32 = torch.float32  # exact sink and window unrounded (the default is 16 bits)

V = 128
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"sliding_window": 16, "sliding_window_pattern": 2}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "eos_token_id": 1,
                                                "bos_token_id": 2}),
}


def tiny(family: str, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, layers: int = 2,
         **extra):
    cfg_name, model_name, fam = FAMILIES[family]
    kw = dict(vocab_size=V, hidden_size=heads * head_dim, intermediate_size=64,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              max_position_embeddings=2048)
    kw.update(fam)
    kw["head_dim"] = head_dim
    kw.update(extra)
    cfg = getattr(T, cfg_name)(**kw)
    torch.manual_seed(0)
    model = getattr(T, model_name)(cfg).eval()
    return model, cfg


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _steps(model, cache, ids, prefill, mask=None):
    """Prefill `prefill` tokens, then one token per step; returns all logits."""
    out = []
    with torch.no_grad():
        am = None if mask is None else mask[:, :prefill]
        out.append(model(ids[:, :prefill], attention_mask=am, past_key_values=cache).logits)
        for t in range(prefill, ids.shape[1]):
            am = None if mask is None else mask[:, : t + 1]
            out.append(model(ids[:, t:t + 1], attention_mask=am, past_key_values=cache).logits)
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------ codec "none" == DynamicCache


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_none_codec_logits_equal_dynamic_cache(family):
    model, cfg = tiny(family)
    ids = _ids(2, 150)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding in the second row
    ref = _steps(model, DynamicCache(config=cfg), ids, 140, mask)
    cache = EccoCache(cfg, "none", residual_length=8, exact_dtype=F32)
    got = _steps(model, cache, ids, 140, mask)
    assert torch.equal(ref, got)
    # everything older than the window really went through the codec
    lay = [x for x in cache.layers if isinstance(x, EccoLayer)]
    assert lay and all(x.k.compressed_len == 150 - 8 - 4 for x in lay)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generate_greedy_and_beam_equal_dynamic_cache(family):
    model, cfg = tiny(family)
    ids = _ids(2, 40, seed=1)
    for kw in ({"do_sample": False}, {"do_sample": False, "num_beams": 3}):
        a = model.generate(ids, max_new_tokens=12, past_key_values=DynamicCache(config=cfg),
                           pad_token_id=0, **kw)
        cache = EccoCache(cfg, "none", residual_length=5, exact_dtype=F32)
        b = model.generate(ids, max_new_tokens=12, past_key_values=cache, pad_token_id=0, **kw)
        assert torch.equal(a, b), kw


def test_sliding_layers_native_and_compressed():
    model, cfg = tiny("gemma3", layers=4)
    kinds = [type(x).__name__ for x in EccoCache(cfg).layers]
    assert kinds == ["DynamicSlidingWindowLayer", "EccoLayer"] * 2
    ids = _ids(1, 60, seed=2)
    ref = _steps(model, DynamicCache(config=cfg), ids, 40)
    cache = EccoCache(cfg, "none", sliding="compress", residual_length=4, exact_dtype=F32)
    assert all(isinstance(x, EccoLayer) for x in cache.layers)
    got = _steps(model, cache, ids, 40)
    # the masked-out history changes only the summation order
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="sliding"):
        EccoCache(cfg, sliding="drop")
    with pytest.raises(ValueError, match="cannot take a codec"):
        EccoCache(cfg, layers={0: "int4"})


def test_crop_select_repeat_like_dynamic_cache():
    model, cfg = tiny("llama")
    ids = _ids(3, 90, seed=3)
    caches = [DynamicCache(config=cfg), EccoCache(cfg, "none", residual_length=6, exact_dtype=F32)]
    outs = []
    with torch.no_grad():
        for c in caches:
            model(ids[:, :80], past_key_values=c)
            c.crop(-13)  # into the compressed part (80 - 6 tokens are compressed)
            a = model(ids[:, 67:75], past_key_values=c).logits
            c.batch_select_indices(torch.tensor([2, 0]))
            b = model(ids[[2, 0], 75:76], past_key_values=c).logits
            c.batch_repeat_interleave(2)
            d = model(ids[[2, 2, 0, 0], 76:80], past_key_values=c).logits
            c.reorder_cache(torch.tensor([3, 0, 1, 2]))
            e = model(ids[[0, 2, 2, 0], 80:81], past_key_values=c).logits
            outs.append((a, b, d, e, c.get_seq_length()))
    for x, y in zip(outs[0][:4], outs[1][:4], strict=True):
        assert torch.equal(x, y)
    assert outs[0][4] == outs[1][4] == 81


def test_repeat_shares_compressed_storage():
    model, cfg = tiny("llama", layers=1)
    cache = EccoCache(cfg, "ecco4", residual_length=0, sink_tokens=0)
    with torch.no_grad():
        model(_ids(1, 256), past_key_values=cache)
    one = cache.memory_report()
    cache.batch_repeat_interleave(4)
    four = cache.memory_report()
    assert four["fp16_bytes"] == 4 * one["fp16_bytes"]
    assert four["total_bytes"] == one["total_bytes"]  # beams share the compressed chunks


# ------------------------------------------------------------------ lossy: exact inputs


def _run_layer(layer: EccoLayer, steps: list[int], B=2, H=2, D=16, seed=0):
    """Feed random K/V in steps of the given sizes; returns the inputs and returned tensors."""
    g = torch.Generator().manual_seed(seed)
    ks, vs, outs = [], [], []
    for s in steps:
        k = torch.randn(B, H, s, D, generator=g) * (1 + torch.arange(D) % 5)
        v = torch.randn(B, H, s, D, generator=g)
        outs.append(layer.update(k, v))
        ks.append(k)
        vs.append(v)
    return torch.cat(ks, 2), torch.cat(vs, 2), outs


def _expected_views(X, steps, spec, residual, sink, gran):
    """What each step must attend to, computed independently of the cache: the first
    `sink` tokens exact, then decode(encode(.)) of every chunk compressed before the step
    (multiples of `gran` tokens older than the window), then the rest exact."""
    codec, flat = spec.codec, spec.axis == "channels"

    def roundtrip(x):
        y = x.reshape(x.shape[0], -1) if flat else x
        return codec.decode(codec.encode(y, axis=1)).reshape(x.shape)

    chunks: list[tuple[int, int]] = []
    views, done, seen = [], 0, 0
    for s in steps:
        e = X[:, :, : seen + s].clone()
        for a, z in chunks:
            for b in range(X.shape[0]):
                e[b, :, a:z] = roundtrip(X[b, :, a:z])
        views.append(e)
        seen += s
        n = (seen - sink - done - residual) // gran * gran
        if n > 0:
            chunks.append((sink + done, sink + done + n))
            done += n
    return views, done


def _gran(layer, head_dim):
    return math.lcm(layer.spec.key.token_granularity(head_dim),
                    layer.spec.value.token_granularity(head_dim))


@pytest.mark.parametrize("name", ["ecco4", "ecco2", "kivi2", "int4", "fp8"])
@pytest.mark.parametrize("sink", [0, 3])
def test_attention_inputs_are_decode_of_encode(name, sink):
    layer = EccoLayer(layer_spec(name), residual_length=20, sink_tokens=sink, exact_dtype=F32)
    steps = [150, 1, 1, 100, 3, 140, 1]
    K, Vv, outs = _run_layer(layer, steps)
    for stream, X, idx in ((layer.k, K, 0), (layer.v, Vv, 1)):
        views, done = _expected_views(X, steps, stream.spec, 20, sink, _gran(layer, 16))
        for out, expect in zip(outs, views, strict=True):
            assert torch.equal(out[idx], expect)
        assert done > 0 and stream.compressed_len == done


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", ["ecco4", "kivi2"])
def test_model_attention_inputs_are_decode_of_encode(family, name):
    """On each model family, every layer's attention inputs (what `update` returns on the
    decoding path) are the recorded K/V of that layer through the codec, chunk by chunk."""
    model, cfg = tiny(family)
    cache = EccoCache(cfg, name, residual_length=8, sink_tokens=2, fused=False,
                      exact_dtype=F32)
    cfg._attn_implementation = "sdpa"
    rec: dict[int, list] = {}
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, EccoLayer):
            def wrapped(k, v, *a, _orig=layer.update, _i=i, **kw):
                out = _orig(k, v, *a, **kw)
                rec.setdefault(_i, []).append((k.clone(), v.clone(), out[0], out[1]))
                return out
            layer.update = wrapped
    steps = [150, 1, 1, 1]
    _steps(model, cache, _ids(1, sum(steps), seed=4), steps[0])
    assert rec
    for i, calls in rec.items():
        layer = cache.layers[i]
        for which, spec in ((0, layer.spec.key), (1, layer.spec.value)):
            X = torch.cat([c[which] for c in calls], dim=2)
            views, done = _expected_views(X, steps, spec, 8, 2, _gran(layer, X.shape[-1]))
            assert done > 0
            for c, expect in zip(calls, views, strict=True):
                assert torch.equal(c[2 + which], expect)


@pytest.mark.parametrize("residual,prompt", [(64, 10), (64, 64), (64, 65), (64, 191), (64, 192),
                                             (0, 128), (0, 5), (128, 1000)])
def test_residual_window_edges(residual, prompt):
    layer = EccoLayer(layer_spec("ecco4"), residual_length=residual, sink_tokens=0)
    _run_layer(layer, [prompt])
    gran = 128
    comp = max(0, (prompt - residual) // gran * gran)
    assert layer.k.compressed_len == layer.v.compressed_len == comp
    assert layer.k.exact.shape[2] == prompt - comp
    assert residual <= layer.k.exact.shape[2] < residual + gran or prompt < residual + gran
    assert layer.get_seq_length() == prompt


def test_group_completes_in_the_middle_of_a_multi_token_step():
    layer = EccoLayer(layer_spec("kivi4"), residual_length=16, sink_tokens=0)
    _run_layer(layer, [40, 30])  # K groups of 32 tokens, V 2 (32 of 16 channels): lcm 32
    assert layer.k.compressed_len == layer.v.compressed_len == 32
    assert layer.k.exact.shape[2] == layer.v.exact.shape[2] == 38
    _run_layer(layer, [27])  # 97 tokens: 97 - 16 = 81 -> 64 compressed, the second group
    assert layer.k.compressed_len == layer.v.compressed_len == 64
    assert len(layer.k.chunks) == len(layer.v.chunks) == 2


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("name", ["ecco4", "kivi2"])
def test_any_head_dim_gqa_mqa(head_dim, name):
    for kv_heads in (4, 1):  # GQA and MQA
        model, cfg = tiny("llama", heads=4, kv_heads=kv_heads, head_dim=head_dim, layers=1)
        cache = EccoCache(cfg, name, residual_length=16)
        ids = _ids(2, 170)
        ref = _steps(model, DynamicCache(config=cfg), ids, 160)
        got = _steps(model, cache, ids, 160)
        assert got.shape == ref.shape and torch.isfinite(got).all()
        # compressed context: close to the exact logits, but not identical
        err = (got - ref).norm() / ref.norm()
        assert 0 < err < 0.2


# ------------------------------------------------------------------ accounting and errors


def test_memory_report_counts_every_byte():
    model, cfg = tiny("qwen2", layers=2)
    cache = EccoCache(cfg, "ecco4", residual_length=32, sink_tokens=0)
    with torch.no_grad():
        model(_ids(1, 300), past_key_values=cache)
    r = cache.memory_report()
    assert r["fp16_bytes"] == 2 * 2 * 2 * 300 * 16 * 2  # layers * K/V * kv_heads * T * D * 2 B
    assert r["total_bytes"] == sum(x["total_bytes"] for x in r["layers"])
    lay = r["layers"][0]
    k = lay["key"]
    assert k["compressed_tokens"] == 256 and k["exact_tokens"] == 44
    assert k["exact_bytes"] == 2 * 44 * 16 * 2  # float32 model: 16 bits by default
    # ecco4: 64 bytes per 128 values + the chunk's tscale and 8-byte stream pad
    values = 2 * 256 * 16
    assert k["compressed_bytes"] == values // 2 + 4 + 8
    assert k["metadata_bytes"] >= 32
    assert lay["total_bytes"] == sum(lay[s]["compressed_bytes"] + lay[s]["metadata_bytes"]
                                     + lay[s]["exact_bytes"] for s in ("key", "value"))


def test_invalid_arguments():
    _, cfg = tiny("llama")
    with pytest.raises(ValueError, match="unknown codec|Unknown codec|not a registered"):
        EccoCache(cfg, "ecco5")
    with pytest.raises(ValueError, match="residual_length"):
        EccoCache(cfg, residual_length=-1)
    with pytest.raises(ValueError, match="layer indices"):
        EccoCache(cfg, layers={5: "int4"})
    with pytest.raises(ValueError, match="axis"):
        EccoCache(cfg, key_codec=("int4", "heads"))
    with pytest.raises(ValueError, match="model config"):
        EccoCache(None)
    with pytest.raises(ValueError, match="negative"):
        EccoCache(cfg).crop(3)


def test_per_layer_and_per_stream_codecs():
    _, cfg = tiny("llama", layers=3)
    cache = EccoCache(cfg, "ecco4", value_codec=("int4", "channels"),
                      layers={1: "kivi2", 2: {"key_codec": "ecco2"}})
    s = [x.spec for x in cache.layers]
    assert s[0].key.codec.get_config()["id"] == "ecco" and s[0].value.axis == "channels"
    assert s[1].key.codec.get_config() == C.get("kivi2").get_config()
    assert s[1].value.axis == "channels"
    assert s[2].key.codec.get_config()["variant"] == "ecco2"
    assert s[2].value.codec.get_config()["variant"] == "ecco4"
    f = EccoCache(cfg, layers=lambda i: "int2" if i == 0 else None)
    assert f.layers[0].spec.key.codec.get_config()["bits"] == 2
    assert f.layers[1].spec.key.codec.get_config()["id"] == "ecco"
    assert eccokv.EccoCache is EccoCache


def test_nan_in_kv_is_reported():
    layer = EccoLayer(layer_spec("ecco4"), residual_length=0, sink_tokens=0)
    k = torch.randn(1, 1, 128, 16)
    k[0, 0, 5, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.update(k, torch.randn(1, 1, 128, 16))


def test_sink_tokens_stay_exact():
    layer = EccoLayer(layer_spec("ecco4"), residual_length=10, sink_tokens=4, exact_dtype=F32)
    K, Vv, outs = _run_layer(layer, [2, 1, 300, 1])
    assert layer.k.sink_len == 4 and layer.k.compressed_len == 256
    assert layer.k.exact_len == 304 - 4 - 256
    k, v = layer.update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16))
    assert torch.equal(k[:, :, :4], K[:, :, :4]) and torch.equal(v[:, :, :4], Vv[:, :, :4])
    assert not torch.equal(k[:, :, 4:260], K[:, :, 4:260])  # compressed
    assert torch.equal(k[:, :, 260:304], K[:, :, 260:304])  # exact window
    layer.crop(-303)  # into the sink
    assert layer.k.sink_len == 2 and layer.k.compressed_len == 0 and layer.get_seq_length() == 2
    with pytest.raises(ValueError, match="sink_tokens"):
        EccoCache(tiny("llama")[1], sink_tokens=-2)


def test_exact_window_is_16_bit_by_default():
    model, cfg = tiny("llama", layers=1)
    ids = _ids(1, 200)
    ref = _steps(model, EccoCache(cfg, "ecco4", residual_length=16, fused=False,
                                  exact_dtype=F32), ids, 190)
    for kw in ({}, {"exact_dtype": torch.float16}):
        c16 = EccoCache(cfg, "ecco4", residual_length=16, **kw)
        got = _steps(model, c16, ids, 190)
        assert (got - ref).abs().max() / ref.abs().max() < 1e-2
        layer = c16.layers[0]
        assert layer.k.held.dtype == kw.get("exact_dtype", torch.bfloat16)
        lay = c16.memory_report()["layers"][0]["key"]
        assert lay["exact_bytes"] == (lay["sink_tokens"] + lay["exact_tokens"]) * 2 * 16 * 2
    f32 = EccoCache(cfg, "ecco4", residual_length=16, exact_dtype=F32)
    _steps(model, f32, ids, 190)
    assert f32.layers[0].k.held.dtype == F32
    with pytest.raises(ValueError, match="exact_dtype"):
        EccoCache(cfg, exact_dtype=torch.int8)
