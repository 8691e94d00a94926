"""eccokv.weights.profile: weight groups, learning / saving a weights profile,
calibrate_weights on a tiny model, and what activation-aware encoding buys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from eccokv import codecs
from eccokv.codecs.ecco import EccoCodec
from eccokv.codecs.ecco_profile import Profile
from eccokv.weights import compress_model, linear_layers, weight_codec
from eccokv.weights.linear import EccoLinear
from eccokv.weights.profile import (
    calibrate_weights,
    learn_weights_profile,
    synthetic_weight_groups,
    weight_groups,
)
from test_cache import _ids, tiny

# small tables: tiny models have a few hundred groups
SHAPES = {"ecco4": {"levels": 14, "patterns": 16, "codebooks": 2},
          "ecco3": {"levels": 8, "patterns": 8, "codebooks": 2}}


def _expected_groups(model, skip=None):
    mods = dict(model.named_modules())
    return sum(mods[n].weight.numel() // 128 for n in linear_layers(model, skip))


def test_weight_groups_flat_layout():
    model, _ = tiny("llama")
    g = weight_groups(model)
    assert g.dtype == np.float32 and g.ndim == 2 and g.shape[1] == 128
    assert len(g) == _expected_groups(model)
    first = linear_layers(model)[0]
    w = dict(model.named_modules())[first].weight.detach().reshape(-1)[:128]
    np.testing.assert_array_equal(g[0], w.numpy())  # row-major, 128 consecutive values
    # the LM head is skipped by default; skip=() takes it too
    assert len(weight_groups(model, skip=())) == _expected_groups(model, skip=())
    assert len(weight_groups(model, skip=())) > len(g)
    # importance: same shape, groups resampled from the model's own groups
    imp = {n: torch.rand(dict(model.named_modules())[n].in_features) + 0.1
           for n in linear_layers(model)}
    gi = weight_groups(model, importance=imp)
    assert gi.shape == g.shape
    rows = {r.tobytes() for r in g}
    assert all(r.tobytes() in rows for r in gi)


def test_weight_groups_partial_rows():
    lin = nn.Linear(100, 3)  # 300 values: two full groups, the rest left out
    model = nn.Sequential(lin)
    g = weight_groups(model)
    assert g.shape == (2, 128)
    np.testing.assert_array_equal(g.reshape(-1), lin.weight.detach().reshape(-1)[:256])


def test_synthetic_weight_groups():
    g = synthetic_weight_groups(500, seed=3)
    assert g.shape == (500, 128) and g.dtype == np.float32 and np.isfinite(g).all()
    np.testing.assert_array_equal(g, synthetic_weight_groups(500, seed=3))


def test_learn_profile_roundtrip(tmp_path):
    model, _ = tiny("llama")
    prof = learn_weights_profile([model], variants=("ecco4", "ecco3"), synthetic=0.25,
                                 shapes=SHAPES, info={"command": "test"})
    assert set(prof.variants) == {"ecco4", "ecco3"}
    assert prof.tables("ecco4").n_patterns == 16
    assert prof.info["kind"] == "weights" and prof.info["command"] == "test"
    assert prof.info["synthetic_groups"] > 0
    assert prof.info["groups_per_source"] == [_expected_groups(model)]
    path = tmp_path / "w.ecprof"
    prof.save(path)
    back = Profile.load(path)
    assert back.hash == prof.hash and back.info["command"] == "test"
    # groups arrays and models mix; sources are balanced
    many = learn_weights_profile([model, synthetic_weight_groups(5000)], variants=("ecco4",),
                                 synthetic=0.0, shapes=SHAPES, max_groups=1000)
    assert many.info["groups_per_source"] == [_expected_groups(model), 1000 // 2]
    with pytest.raises(ValueError, match="synthetic"):
        learn_weights_profile([model], synthetic=1.0)
    with pytest.raises(ValueError, match="shape"):
        learn_weights_profile([np.zeros((4, 64), np.float32)])


def test_calibrate_weights_tiny_model(tmp_path):
    model, _ = tiny("llama")
    calib = [_ids(1, 32, seed=1), _ids(1, 32, seed=2)]
    path = tmp_path / "tiny.ecprof"
    prof, rep = calibrate_weights(model, path, calibration=calib, activation_weighted=True,
                                  variants=("ecco4",), synthetic=0.25, shapes=SHAPES,
                                  command="pytest")
    assert path.is_file() and rep["hash"] == prof.hash and rep["activation_weighted"]
    loaded = Profile.load(path)
    assert loaded.hash == prof.hash and loaded.info["command"] == "pytest"
    codec = EccoCodec(variant="ecco4", profile=str(path))
    assert codec.profile_hash == prof.tables("ecco4").hash
    ids = _ids(1, 24, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
    compress_model(model, codec, calibration=calib)
    assert all(isinstance(m, EccoLinear) and m.activation_aware
               for n, m in model.named_modules() if n in linear_layers(model))
    assert model.eccokv_weights["codec"]["profile_hash"] == codec.profile_hash
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert float((out - ref).norm() / ref.norm()) < 0.2
    # a config naming the file's tables by hash resolves (tables registered on load)
    cfg = {"id": "ecco", "variant": "ecco4", "profile": str(path),
           "profile_hash": codec.profile_hash}
    assert codecs.get(cfg).profile_hash == codec.profile_hash


def test_calibrate_weights_uniform_without_calibration():
    model, _ = tiny("qwen2")
    prof, rep = calibrate_weights(model, None, variants=("ecco3",), shapes=SHAPES)
    assert not rep["activation_weighted"] and rep["out"] is None
    assert set(prof.variants) == {"ecco3"}


def _salient_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(512, 96, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 512, generator=g) * 0.05)
    std = torch.ones(512)
    std[torch.randperm(512, generator=g)[:12]] = 40.0  # a few large-variance channels
    x = torch.randn(4096, 512, generator=g) * std
    return lin, x


@pytest.mark.parametrize("variant", ["ecco4", "ecco3"])
def test_activation_aware_lowers_output_error(variant):
    lin, x = _salient_case()
    imp = (x.double() ** 2).mean(0)
    codec = weight_codec(variant)
    w = lin.weight.detach()

    def out_err(layer):
        with torch.no_grad():
            return float((layer(x) - x @ w.T).norm() / (x @ w.T).norm())

    plain = out_err(EccoLinear.from_linear(lin, codec))
    aware_layer = EccoLinear.from_linear(lin, codec, importance=imp)
    assert aware_layer.activation_aware
    aware = out_err(aware_layer)
    assert aware < 0.8 * plain, (aware, plain)
