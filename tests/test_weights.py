"""eccokv.weights: EccoLinear against decode-then-matmul, compress_model over the registry
on tiny models of each family (and an encoder), memory_report, activation-aware encoding,
bad input and corrupt blocks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers as T
from torch import nn

from eccokv import codecs
from eccokv.codecs import CodecError
from eccokv.weights import EccoLinear, compress_model, linear_layers, memory_report
from eccokv.weights.linear import GEMV_MAX_TOKENS
from test_cache import FAMILIES, _ids, tiny

SHAPES = [(64, 128), (37, 300), (100, 200), (130, 576), (8, 1536), (3, 5)]


def _lin(o: int, i: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(i, o, bias=bias)
    lin.weight.data = torch.randn(o, i) * 0.05 * (1 + torch.rand(1, i) * 3)
    return lin


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("codec", ["ecco4", "ecco3", "int4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, GEMV_MAX_TOKENS + 1, 70])
def test_forward_equals_decode_then_matmul_fp32(codec, shape, tokens):
    lin = _lin(*shape)
    m = EccoLinear.from_linear(lin, codec)
    W = m.dequantize()
    x = torch.randn(2, tokens, shape[1])
    ref = x @ W.t() + lin.bias.detach()
    y = m(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert _rel(y, ref) < 1e-5
    # the decoded weight is the codec's own decode of the flat layout
    c = m.compressed()
    assert torch.equal(codecs.get(c.codec_config).decode(c).float().reshape(shape), W)


@pytest.mark.parametrize("shape", [(37, 300), (130, 576)])
@pytest.mark.parametrize("tokens", [1, 40])
def test_forward_bf16(shape, tokens):
    lin = _lin(*shape).to(torch.bfloat16)
    m = EccoLinear.from_linear(lin, "ecco4")
    x = torch.randn(tokens, shape[1]).to(torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    ref = (x.float() @ m.dequantize().t() + lin.bias.float())
    # computed in float32, rounded once to bfloat16
    assert torch.equal(y, ref.to(torch.bfloat16)) or _rel(y, ref) < 2 ** -7
    assert _rel(y.float(), ref.to(torch.bfloat16).float()) < 1e-2


def test_fused_and_tiled_paths_agree():
    lin = _lin(300, 576, seed=3)
    m = EccoLinear.from_linear(lin, "ecco4")
    x = torch.randn(5, 576)
    m.gemv_max_tokens = 0
    tiled = m(x)
    m.gemv_max_tokens = 8
    assert m.fused
    assert _rel(m(x), tiled) < 1e-5


def test_bits_and_bytes():
    m = EccoLinear.from_linear(_lin(576, 576), "ecco4")
    assert 4.0 <= m.bits_per_weight <= 4.001  # flat layout: no per-row padding
    assert m.nbytes == m.weight_nbytes + 576 * 4
    m = EccoLinear.from_linear(_lin(192, 576, bias=False), "int4")
    assert m.bits_per_weight == pytest.approx(4.25, abs=1e-3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compress_model_each_family(family):
    model, _ = tiny(family)
    ids = _ids(1, 24)
    with torch.no_grad():
        ref = model(ids).logits
    names = linear_layers(model)
    assert names and not any(n.endswith("lm_head") for n in names)
    compress_model(model, "ecco4")
    assert all(isinstance(model.get_submodule(n), EccoLinear) for n in names)
    with torch.no_grad():
        got = model(ids).logits
        step = model(ids[:, :1]).logits  # one token: the fused decode-GEMV
    assert torch.isfinite(got).all() and torch.isfinite(step).all()
    assert float((got - ref).norm() / ref.norm()) < 0.5
    rep = memory_report(model)
    assert rep["layers"] == len(names)
    assert rep["linear_bytes"] <= 0.26 * rep["linear_fp16_bytes"] + 64 * len(names)
    assert rep["bits_per_weight"] < 4.1


@pytest.mark.parametrize("codec", codecs.available())
def test_every_registered_codec_through_compress_model(codec):
    model, _ = tiny("llama")
    ids = _ids(1, 12)
    with torch.no_grad():
        ref = model(ids).logits
    compress_model(model, codec)
    with torch.no_grad():
        got = model(ids).logits
    assert torch.isfinite(got).all()
    if codec == "none":
        assert torch.equal(got, ref)
    rep = memory_report(model)
    assert rep["linear_bytes"] > 0 and rep["weights"] > 0


def test_encoder_model():
    cfg = T.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=96)
    torch.manual_seed(0)
    model = T.BertModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    compress_model(model, "ecco4")
    assert memory_report(model)["layers"] == 13  # (q, k, v, o, intermediate, output) x 2, pooler
    with torch.no_grad():
        got = model(ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min()
    assert float(cos) > 0.9


def test_skip_patterns_and_lm_head():
    model, _ = tiny("llama")
    compress_model(model, "int4", skip=["lm_head", "*.mlp.*"])
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, EccoLinear)
    with pytest.raises(ValueError, match="no nn.Linear"):
        compress_model(nn.Sequential(nn.ReLU()), "ecco4")
    with pytest.raises(TypeError, match="nn.Module"):
        compress_model("model", "ecco4")
    with pytest.raises(KeyError, match="unknown codec"):
        compress_model(tiny("llama")[0], "ecco5")


def test_activation_aware_lowers_weighted_error():
    # a layer whose inputs have a few high-variance channels: their weights matter most
    lin = _lin(64, 256, bias=False, seed=5)
    scale = torch.ones(256)
    scale[:8] = 30.0
    x = torch.randn(4000, 256) * scale
    e2 = (x.double() ** 2).mean(0)
    y = x @ lin.weight.detach().t()
    err = {}
    for aware in (False, True):
        m = EccoLinear.from_linear(lin, "ecco4", importance=e2 if aware else None)
        assert m.activation_aware == aware
        err[aware] = float((x @ m.dequantize().t() - y).norm() / y.norm())
    assert err[True] < 0.8 * err[False], err


def test_calibration_moments_and_errors():
    model, _ = tiny("llama")
    m2 = copy.deepcopy(model)
    compress_model(model, "ecco4", calibration=[_ids(1, 16), _ids(2, 8, seed=1)[0]])
    rep = memory_report(model)
    assert rep["activation_aware_layers"] == rep["layers"]
    with pytest.raises(TypeError, match="token ids"):
        compress_model(m2, "ecco4", calibration=[torch.randn(1, 5)])
    with pytest.raises(TypeError, match="non-empty list"):
        compress_model(m2, "ecco4", calibration=[])


def test_importance_validation():
    c = codecs.get("ecco4")
    x = torch.randn(4, 256)
    with pytest.raises(ValueError, match="importance has shape"):
        c.encode(x, axis=1, importance=np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        c.encode(x, axis=1, importance=np.full(256, np.nan))
    with pytest.raises(ValueError, match="finite"):
        c.encode(x, axis=1, importance=-np.ones(256))
    # all-ones importance is the unweighted encoder, bit for bit
    a = c.encode(x, axis=1)
    b = c.encode(x, axis=1, importance=np.ones(256))
    assert np.array_equal(a.arrays["blocks"], b.arrays["blocks"])


def test_bad_input_and_corrupt_blocks():
    m = EccoLinear.from_linear(_lin(64, 256), "ecco4")
    with pytest.raises(ValueError, match="features"):
        m(torch.randn(2, 255))
    m.w_blocks[:-8] = 0xFF  # Huffman mode, longest codes: every code stream overruns
    m.w_blocks[:-8:64] = 0xFE
    for tokens in (1, 40):
        with pytest.raises(CodecError, match="corrupt"):
            m(torch.randn(tokens, 256))
    with pytest.raises(CodecError, match="corrupt"):
        m.check()
    m2 = EccoLinear.from_linear(_lin(64, 256), "ecco4")
    m2.w_tscale.copy_(torch.from_numpy(np.array([np.nan], np.float32).view(np.uint8)))
    with pytest.raises(CodecError):
        m2(torch.randn(1, 256))
    with pytest.raises(CodecError):
        m2(torch.randn(40, 256))


def test_dtype_cast_keeps_blocks():
    model, _ = tiny("llama")
    compress_model(model, "ecco4")
    ids = _ids(1, 8)
    with torch.no_grad():
        ref = model(ids).logits
        model.to(torch.bfloat16)
        got = model(ids).logits
    assert got.dtype == torch.bfloat16
    assert float((got.float() - ref).norm() / ref.norm()) < 0.05
