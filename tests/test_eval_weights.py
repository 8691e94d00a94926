"""eccokv.eval.weights on tiny random models: the evaluation functions run and agree with
each other, the HQQ / quanto baselines give finite outputs, and bits/weight and model
bytes match hand-computed values."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as T

from eccokv.eval import common as E
from eccokv.eval import weights as W

V = 256


def tiny_llama() -> torch.nn.Module:
    """Every Linear has in_features 128 or 256 and out_features a multiple of 64, so the
    groups of 32/64/128 of every codec are whole (hand-computable bytes)."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=256,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True)
    return T.LlamaForCausalLM(cfg).eval()


def tiny_bert() -> torch.nn.Module:
    """A MiniLM-like BERT encoder (hidden 128, 2 layers)."""
    torch.manual_seed(1)
    cfg = T.BertConfig(vocab_size=V, hidden_size=128, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=256,
                       max_position_embeddings=64)
    return T.BertModel(cfg).eval()


class ToyTokenizer:
    """Characters -> ids, padded; what `weights.embed` needs from a tokenizer."""

    def __call__(self, texts, padding=True, truncation=True, max_length=128,
                 return_tensors=None):
        ids = [[2 + (ord(c) % (V - 2)) for c in t][:max_length] for t in texts]
        if not padding:
            return {"input_ids": ids}
        n = max(len(x) for x in ids)
        return {"input_ids": torch.tensor([x + [0] * (n - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x))
                                                for x in ids])}


def _linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    return [tuple(m.weight.shape) for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and not W._skipped(n, W.SKIP)]


def _float_bytes(model: torch.nn.Module) -> int:
    ptrs = {}
    for t in [*model.parameters(), *model.buffers()]:
        ptrs[t.data_ptr()] = t.numel() * t.element_size()
    return sum(ptrs.values())


# ------------------------------------------------------------------ accounting


def test_parse_config():
    assert W.parse_config("ecco4") == ("ecco4", False)
    assert W.parse_config("ecco3+cal") == ("ecco3", True)
    with pytest.raises(ValueError, match="unknown weight configuration"):
        W.parse_config("ecco9")
    with pytest.raises(ValueError, match="eccokv codecs only"):
        W.parse_config("hqq4+cal")


@pytest.mark.parametrize("name,bits", [
    ("int4", 4 + 2 * 16 / 128),  # codes + fp16 scale + fp16 zero per 128 values
    ("int4-g32", 4 + 2 * 16 / 32),
    ("hqq4", 4 + 2 * 16 / 64),  # HQQ default group 64, fp16 scale + zero
    ("quanto-int4", 4 + 2 * 32 / 128),  # quanto: group 128, float32 scale + shift
])
def test_bits_per_weight_hand_computed(name, bits):
    model = tiny_llama()
    shapes = _linear_shapes(model)
    n = sum(o * i for o, i in shapes)
    float_total = _float_bytes(model)
    lin_float = 4 * n  # no biases in Llama's Linear layers
    acc = W.apply_config(model, name)
    assert acc["layers"] == len(shapes) == 14
    assert acc["weights"] == n
    assert acc["weight_bytes"] == pytest.approx(n * bits / 8, abs=0.5)
    assert acc["bits_per_weight"] == pytest.approx(bits)
    # everything else (tied embeddings counted once, norms, rotary buffer) is unchanged;
    # quanto adds a few scalar buffers per layer (input/output scales)
    extra = acc["model_bytes"] - (float_total - lin_float + acc["weight_bytes"])
    assert 0 <= extra <= (64 * len(shapes) if name == "quanto-int4" else 0)
    assert math.isfinite(acc["weight_error"]["rel_rmse"]) and acc["weight_error"]["max_abs"] > 0


def test_ecco_bits_and_model_bytes_match_memory_report():
    from eccokv.weights import memory_report

    model = tiny_llama()
    shapes = _linear_shapes(model)
    acc = W.apply_config(model, "ecco4")
    rep = memory_report(model)
    assert acc["weight_bytes"] == rep["weight_bytes"]
    assert acc["bits_per_weight"] == pytest.approx(rep["bits_per_weight"])
    assert acc["model_bytes"] == rep["model_bytes"]
    # 64 bytes per block of 128 values, plus a constant per layer (< 16 bytes here)
    blocks = sum(o * i // 128 for o, i in shapes)
    assert 0 <= acc["weight_bytes"] - 64 * blocks < 16 * acc["layers"]


def test_float_accounting_counts_tied_tensors_once():
    model = tiny_llama()
    acc = W.weight_accounting(model)
    assert acc["layers"] == 0 and acc["bits_per_weight"] is None
    emb = V * 128 * 4
    assert acc["model_bytes"] == _float_bytes(model)
    assert acc["model_bytes"] < sum(p.numel() * 4 for p in model.parameters()) + emb


def test_lossless_when_the_weights_lie_on_the_grid():
    """int4 g32 on weights that are already int4 g32 (fp16 scale/zero): no error."""
    model = tiny_llama()
    W.apply_config(model, "int4-g32")
    from eccokv.weights import EccoLinear

    deq = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, EccoLinear)}
    again = tiny_llama()
    mods = dict(again.named_modules())
    for n, w in deq.items():
        mods[n].weight.data.copy_(w)
    acc = W.apply_config(again, "int4-g32")
    assert acc["weight_error"]["max_abs"] == 0.0 and acc["weight_error"]["lossless"]


def test_baselines_finite_and_close():
    ids = torch.randint(3, V, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = tiny_llama()(ids).logits
    for name in ("hqq4", "quanto-int4", "ecco4+cal"):
        model = tiny_llama()
        acc = W.apply_config(model, name, calibration=[ids])
        out = model(ids).logits
        assert out.dtype == ref.dtype and torch.isfinite(out).all(), name
        assert (out - ref).abs().max() < 0.5 * ref.abs().max(), name
        assert acc["activation_aware"] is name.endswith("+cal")


# ------------------------------------------------------------------ perplexity


def test_ppl_rows_consistent():
    wins = torch.randint(3, V, (3, 268), generator=torch.Generator().manual_seed(2))
    rows = W.ppl_rows(tiny_llama, ["int4", "hqq4"], wins, context=260, residual=0,
                      n_boot=200, show_progress=False)
    assert [(r["weights"], r["kv"]) for r in rows] == [
        (w, kv) for w in ("float", "int4", "hqq4") for kv in ("none", "ecco4")]
    ref = rows[0]
    assert ref["rel_change_pct"] == 0.0 and ref["ci_low_pct"] == ref["ci_high_pct"] == 0.0
    for r in rows:
        assert len(r["window_nll"]) == 3 and r["tokens_scored"] == 3 * 8
        assert r["ppl"] == pytest.approx(math.exp(sum(r["window_nll"]) / 3))
        assert r["ci_low_pct"] <= r["rel_change_pct"] <= r["ci_high_pct"]
        assert r["rel_change_pct"] == pytest.approx(
            100 * (r["ppl"] / ref["ppl"] - 1), rel=1e-9, abs=1e-9)
        if r["kv"] == "ecco4":
            assert r["kv_bits"]["compressed_values"] > 0  # the context was compressed
            same = next(x for x in rows if x["weights"] == r["weights"] and x["kv"] == "none")
            assert r["kv_only"]["rel_change_pct"] == pytest.approx(
                100 * (r["ppl"] / same["ppl"] - 1), rel=1e-9, abs=1e-9)
        else:
            assert "kv_only" not in r
    assert rows[2]["bits_per_weight"] == pytest.approx(4.25)
    # the same weights give the same numbers (fresh model per configuration)
    again = W.ppl_rows(tiny_llama, ["int4"], wins[:1], context=260, residual=0,
                       n_boot=10, show_progress=False)
    assert again[2]["window_nll"][0] == rows[2]["window_nll"][0]


# ------------------------------------------------------------------ MiniLM-like


def test_embedding_agreement_identity_and_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 16, generator=g)
    same = W.embedding_agreement(x, x.clone(), k=5)
    assert same["cosine_mean"] == pytest.approx(1.0) and same["pairwise_spearman"] == \
        pytest.approx(1.0)
    assert same["top5_overlap"] == 1.0 and same["top1_agreement"] == 1.0
    assert same["pairs"] == 30 * 29 // 2
    noisy = W.embedding_agreement(x, x + 0.5 * torch.randn(30, 16, generator=g), k=5)
    assert noisy["cosine_mean"] < 1.0 and -1 <= noisy["pairwise_spearman"] < 1.0
    assert 0 <= noisy["top5_overlap"] <= 1


def test_spearman_matches_definition():
    a = torch.tensor([0.1, 0.4, 0.2, 0.9]).numpy()
    assert W.spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert W.spearman(a, -a) == pytest.approx(-1.0)


def test_minilm_rows_on_tiny_bert():
    sents = [f"Sentence number {i} says something about {w}." for i, w in
             enumerate(["cats", "dogs", "rivers", "mountains", "the sea", "trains"] * 2)]
    res = W.minilm_rows(tiny_bert, ToyTokenizer(), sents, ["int4-g32", "hqq4", "quanto-int4",
                                                           "ecco4+cal"],
                        k=3, show_progress=False)
    assert res["sentences"] == 12 and res["hidden"] == 128
    assert [r["weights"] for r in res["rows"]] == ["int4-g32", "hqq4", "quanto-int4",
                                                   "ecco4+cal"]
    for r in res["rows"]:
        assert 0.5 < r["cosine_mean"] <= 1.0 + 1e-9 and r["cosine_min"] <= r["cosine_mean"]
        assert -1 <= r["pairwise_spearman"] <= 1 and 0 <= r["top3_overlap"] <= 1
        assert r["pairs"] == 66
        # MiniLM's pooler is compressed too (skip=()): 2 x 6 layer Linears + pooler
        assert r["accounting"]["layers"] == 13
    assert res["rows"][0]["bits_per_weight"] == pytest.approx(5.0)


def test_minilm_sentences_real_text():
    s = W.minilm_sentences(200)
    assert len(s) == 200 and len(set(s)) == 200
    assert all(8 <= len(x.split()) <= 40 and x.endswith(".") for x in s)


# ------------------------------------------------------------------ speed and reports


def test_speed_worker_in_process(monkeypatch):
    from eccokv import data

    wins = torch.randint(3, V, (1, 64))
    monkeypatch.setattr(data, "token_windows", lambda *a, **k: wins)
    r = W.speed_worker("int4", model=tiny_llama(), tokenizer=object(), prefill_tokens=64,
                       prompt_tokens=8, new_tokens=5, repeats=2)
    assert r["new_tokens"] == 5 and len(r["prefill_s_all"]) == 2 and len(r["decode_s_all"]) == 2
    assert r["decode_tokens_per_s"] > 0 and r["prefill_s"] > 0
    assert r["accounting"]["bits_per_weight"] == pytest.approx(4.25)
    assert r["peak_rss_bytes"] > 0


def test_report_writers(tmp_path):
    wins = torch.randint(3, V, (2, 264), generator=torch.Generator().manual_seed(3))
    rows = W.ppl_rows(tiny_llama, ["int4"], wins, context=260, residual=0, n_boot=50,
                      show_progress=False)
    sents = [f"Short sentence {i} about item {i * 7}." for i in range(8)]
    mini = W.minilm_rows(tiny_bert, ToyTokenizer(), sents, ["int4"], k=2, show_progress=False)
    fake_speed = {"config": "fp32", "accounting": W.weight_accounting(tiny_llama()),
                  "prefill_s": 0.1, "decode_tokens_per_s": 10.0, "peak_rss_bytes": 2**20,
                  "run_peak_rss_bytes": None, "VmRSS_after_load": 2**20,
                  "model_bytes_vs_fp32": 1.0, "decode_speed_vs_fp32": 1.0,
                  "same_tokens_as_fp32": True}
    result = {"evaluation": "weights", "command": "test", "model": {"name": "tiny"},
              "data": {"windows": 2, "context": 260, "score": 4, "description": "random"},
              "protocol": {"residual": 0, "text": "test"}, "environment": E.environment(),
              "ppl": {"rows": rows}, "minilm": {"pooling": "mean", **mini},
              "speed": {"prefill_tokens": 64, "new_tokens": 5, "repeats": 1,
                        "rows": [fake_speed]}}
    paths = W.write(result, tmp_path)
    md = (tmp_path / "weights.md").read_text()
    assert "int4 g128 RTN" in md and "Source digest" in md and "pairwise Spearman" in md
    loaded = json.loads((tmp_path / "weights.json").read_text())
    assert loaded["environment"]["source_digest"] and len(paths) == 2
    assert (tmp_path / "weights.png").stat().st_size > 0


def test_ppl_with_weights_writes_its_own_files(tmp_path, monkeypatch):
    from eccokv import data, models

    wins = torch.randint(3, V, (2, 264), generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_llama(), object()))
    monkeypatch.setattr(data, "token_windows", lambda *a, **k: wins)
    res = W.ppl_with_weights("int4", out_dir=tmp_path, codecs=["ecco4"], context=260,
                             score=4, windows=2, residuals=[0], n_boot=20,
                             show_progress=False)
    assert res["weights"]["bits_per_weight"] == pytest.approx(4.25)
    assert res["command"] == "eccokv eval ppl --weights int4"
    names = [r["name"] for r in res["settings"][0]["rows"]]
    assert names == ["none", "ecco4"]
    saved = json.loads((tmp_path / "quality-weights-int4.json").read_text())
    assert saved["weights"]["config"] == "int4"
    assert "Weights compressed first: **int4**" in (tmp_path / "quality-weights-int4.md"
                                                     ).read_text()
    assert not (tmp_path / "quality.json").exists()
