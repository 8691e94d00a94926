"""Calibration on a tiny random model (runs in CI) and CLI smoke tests."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

from eccokv.calibration import kv_groups
from eccokv.codecs.ecco import EccoCodec
from eccokv.codecs.ecco_calibrate import build_profile
from eccokv.codecs.ecco_profile import Profile


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                      max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def test_calibration_on_a_tiny_model(tmp_path):
    from eccokv.hf.capture import capture_kv

    model = _tiny_llama()
    ids = torch.randint(0, 256, (2, 512), generator=torch.Generator().manual_seed(1))
    kv = capture_kv(model, ids)
    groups = kv_groups(kv)
    assert groups.shape[1] == 128 and np.isfinite(groups).all()
    shapes = {"ecco4": {"levels": 14, "patterns": 8, "codebooks": 2},
              "ecco2": {"levels": 4, "patterns": 4, "codebooks": 2}}
    prof = build_profile(groups, variants=("ecco4", "ecco2"), shapes=shapes,
                         info={"model": "tiny-llama"})
    path = tmp_path / "tiny.safetensors"
    prof.save(path)
    loaded = Profile.load(path)
    assert loaded.hash == prof.hash and loaded.info["model"] == "tiny-llama"
    k = kv[0][0]
    for variant, bound in (("ecco4", 0.15), ("ecco2", 0.6)):
        codec = EccoCodec(variant, profile=str(path))
        y = codec.decode(codec.encode(k, axis=2))
        assert ((y - k).norm() / k.norm()).item() < bound


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eccokv.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_help_and_codecs_json():
    r = _cli("--help")
    assert r.returncode == 0 and "calibrate" in r.stdout and "bench" in r.stdout
    r = _cli("codecs", "--json")
    assert r.returncode == 0, r.stderr
    names = [row["name"] for row in json.loads(r.stdout)]
    assert {"none", "int4", "kivi2", "ecco4", "ecco3", "ecco2", "fp8"} <= set(names)


def test_cli_reports_errors_clearly():
    r = _cli("calibrate", "--model", "no-such-model", "--out", "/tmp/x.safetensors")
    assert r.returncode == 2 and "no-such-model" in r.stderr
