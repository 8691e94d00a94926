"""`eccokv eval`: protocols, accounting, statistics, scoring and reports on tiny models.

Tiny random Llama models built from configs and a tiny word-level chat tokenizer built in
memory: no downloads, no mocks of the caches (EccoCache, DynamicCache and transformers'
QuantizedCache run for real).
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import transformers as T
from transformers import DynamicCache

from eccokv.eval import agree, common, memory, needle, ppl
from eccokv.hf.cache import EccoCache

V = 128
HAS_QUANTO = importlib.util.find_spec("optimum.quanto") is not None
needs_quanto = pytest.mark.skipif(
    not HAS_QUANTO, reason="optimum-quanto (transformers' QuantizedCache backend) is not "
    "installed: pip install 'eccokv[eval]'")


def tiny_llama(layers: int = 2, vocab: int = V):
    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, max_position_embeddings=2048)
    torch.manual_seed(0)
    return T.LlamaForCausalLM(cfg).eval()


def windows(n: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def tiny_tokenizer():
    """Word-level fast tokenizer with a ChatML template (vocabulary < V)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", ".", "?",
             "the", "secret", "passcode", "is", "what", "text", "above", "a", "of", "and",
             "answer", "with", "number", "only", "mentioned", "in", "summarise", "detail"]
    words += [str(i) for i in range(10)] + [f"w{i}" for i in range(40)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]",
                                    eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    ws = [f"w{int(i)}" for i in torch.randint(0, 40, (n_words,), generator=g)]
    return " ".join(w + ("." if j % 9 == 8 else "") for j, w in enumerate(ws))


# ------------------------------------------------------------------ the ppl protocol


def test_ppl_protocol_none_equals_dynamic_cache(model):
    ids = windows(1, 200)
    ref, _ = ppl.score_window(model, ids, 160, DynamicCache(config=model.config))
    got, bits = ppl.score_window(model, ids, 160, common.make_cache("none", model.config, 16),
                                 values_per_token=common.values_per_token(model))
    assert torch.equal(ref, got)
    assert ref.shape == (40,) and torch.isfinite(ref).all()
    assert bits["compressed_values"] > 0  # the context really went through the codec


@pytest.mark.parametrize("name", ["ecco4", "kivi2", "fp8",
                                  pytest.param("hf-quanto-int4", marks=needs_quanto)])
def test_shared_prefill_replay_equals_prefill_forward(model, name):
    ids = windows(1, 300, seed=1)
    kv, last = common.exact_prefill(model, ids[:, :256])
    a, ba = ppl.score_window(model, ids, 256, common.make_cache(name, model.config, 128),
                             values_per_token=32)
    b, bb = ppl.score_window(model, ids, 256, common.make_cache(name, model.config, 128),
                             prefill=(kv, last), values_per_token=32)
    assert torch.equal(a, b)
    assert ba == bb


def test_chunked_exact_prefill_matches_one_shot(model):
    ids = windows(1, 300, seed=2)
    kv1, l1 = common.exact_prefill(model, ids)
    kv2, l2 = common.exact_prefill(model, ids, chunk=64)
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kv1[1][0], kv2[1][0], rtol=1e-4, atol=1e-4)


def test_evaluate_summarise_targets_reports(model, tmp_path):
    names = ["ecco4", "kivi3", "int4", "hf-quanto-int3"]  # the last: an unknown row -> error
    raw = ppl.evaluate(model, windows(2, 192), names, 160, residuals=(16, 0),
                       show_progress=False)
    assert raw["names"][0] == "none"
    settings = ppl.summarise(raw, n_boot=200)
    assert [s["residual"] for s in settings] == [16, 0]
    rows = {r["name"]: r for r in settings[0]["rows"]}
    assert rows["none"]["rel_change_pct"] == 0.0
    assert rows["hf-quanto-int3"]["error"].startswith("ValueError")
    assert rows["ecco4"]["tokens_scored"] == 2 * 32
    assert math.isclose(rows["ecco4"]["ppl"], math.exp(rows["ecco4"]["mean_nll"]))
    b = rows["ecco4"]["bits"]
    # residual 16 and 4 sink tokens: the rest of the 160-token context in whole groups of 128
    assert b["compressed_values"] == 2 * 2 * 128 * 2 * 16  # layers x (K,V) x tokens x H x D
    assert 4.0 <= b["compressed_bits_per_value"] < 4.6  # metadata weighs on 4096 values
    k0 = {r["name"]: r for r in settings[1]["rows"]}["kivi3"]["bits"]
    assert k0["compressed_fraction"] >= rows["kivi3"]["bits"]["compressed_fraction"]  # residual 0
    targets = ppl.check_targets(settings, default_residual=16)
    assert any(t["target"].startswith("ecco4 ppl change") for t in targets)
    res = {"command": "eccokv eval ppl (test)", "model": common.model_block(model),
           "data": {"context": 160, "score": 32, "windows": 2, "description": "random"},
           "protocol": {"text": ppl.PROTOCOL}, "environment": common.environment(),
           "settings": settings, "targets": targets, "seconds": 1.0}
    md = ppl.to_markdown(res)
    assert "| ecco4 | ecco |" in md and "ValueError" in md and "## Targets" in md
    paths = common.write_reports(res, md, tmp_path, "quality")
    assert json.loads(paths[0].read_text())["settings"][0]["residual"] == 16
    pytest.importorskip("matplotlib")
    ppl.plot(res, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 1000


@needs_quanto
def test_quantized_cache_rows_and_bits(model):
    raw = ppl.evaluate(model, windows(1, 192), ["hf-quanto-int4", "hf-quanto-int2",
                                                "hf-quanto-int4-kivi"], 128,
                       residuals=(16, 0), show_progress=False)
    s0, s1 = raw["settings"]
    for n, bits in (("hf-quanto-int4", 5.0), ("hf-quanto-int2", 3.0)):
        row = s0["rows"][n]
        assert row["error"] is None and len(row["window_nll"]) == 1
        # float32 model: codes + one fp32 scale and one fp32 shift per 64 values
        assert row["bits"]["compressed_bits_per_value"] == bits
        assert row["bits"]["compressed_fraction"] == 1.0  # the whole prompt, at once
        assert s1["rows"][n] is row  # measured once, shared by both residual settings
    cfg = common.describe_cache("hf-quanto-int4-kivi", 0)
    assert cfg["axis_key"] == -1 and cfg["q_group_size"] == 64 and cfg["residual_length"] == 128


def test_cache_names_default_to_what_users_get(model, monkeypatch):
    import eccokv.kernels.attention as KA

    calls = []
    real = KA.fused_attention
    monkeypatch.setattr(KA, "fused_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = common.make_cache("ecco4", model.config, 16)
    assert isinstance(c, EccoCache) and model.config._attn_implementation == "eccokv"
    with torch.no_grad():
        for t in (150, 1, 1):
            model(windows(1, t, seed=t), past_key_values=c)
    assert calls  # the fused path ran
    lay = c.layers[0]
    assert lay.k.held.dtype == torch.bfloat16 and lay.attn_config is model.config
    assert common.parse_name("ecco4@fp32+decode") == (
        "ecco4", {"exact_dtype": torch.float32, "fused": False})
    assert common.parse_name("none") == ("none", {"exact_dtype": torch.float32})
    assert common.parse_name("kivi2+fused") == ("kivi2", {"fused": True})
    assert common.describe_cache("ecco4+decode", 128)["attention"] == "decode"
    assert common.describe_cache("ecco4@fp16", 128)["exact_dtype"] == "float16"
    assert common.family("ecco4@bf16+decode") == "ecco"
    for bad in ("ecco4+slow", "ecco4@fp8"):
        with pytest.raises(ValueError, match="cache name"):
            common.make_cache(bad, model.config, 16)


# ------------------------------------------------------------------ accounting, statistics


def test_cache_bits_accounting(model):
    kv, _ = common.exact_prefill(model, windows(1, 300))
    vpt = common.values_per_token(model)
    assert vpt == 2 * 16
    c = common.replay(EccoCache(model.config, "int4", residual_length=20), kv)
    b = common.cache_bits(c, vpt)
    rep = c.memory_report()
    assert b.compressed_values + b.exact_values == 2 * 2 * 300 * vpt
    assert b.compressed_values == 2 * 2 * 256 * vpt  # (300 - 4 sink - 20) -> 2 groups of 128
    assert b.compressed_bytes + b.exact_bytes == rep["total_bytes"]
    assert b.exact_bytes == b.exact_values * 2  # window and sinks: 16 bits by default
    assert 4.25 <= b.compressed_bits_per_value < 4.4  # 4 bits + fp16 scale/zero per 128
    d = common.cache_bits(common.replay(DynamicCache(config=model.config), kv), vpt)
    assert d.compressed_values == 0 and d.cache_bits_per_value == 32.0
    assert d.as_dict()["compressed_bits_per_value"] is None


def test_paired_bootstrap():
    ref = [2.0, 2.5, 3.0, 2.2]
    same = common.paired_rel_change(ref, ref)
    assert same["rel_change_pct"] == same["ci_low_pct"] == same["ci_high_pct"] == 0.0
    shifted = common.paired_rel_change([x + 0.01 for x in ref], ref)
    want = 100 * math.expm1(0.01)
    for k in ("rel_change_pct", "ci_low_pct", "ci_high_pct", "window_min_pct",
              "window_max_pct"):
        assert shifted[k] == pytest.approx(want, rel=1e-9)
    g = torch.Generator().manual_seed(0)
    d = (torch.randn(16, generator=g, dtype=torch.float64) * 0.01 + 0.005).tolist()
    r = common.paired_rel_change([2 + x for x in d], [2.0] * 16, n_boot=500, seed=3)
    assert r["ci_low_pct"] < r["rel_change_pct"] < r["ci_high_pct"]
    assert r["window_min_pct"] == pytest.approx(100 * math.expm1(min(d)))
    assert r == common.paired_rel_change([2 + x for x in d], [2.0] * 16, n_boot=500, seed=3)
    assert r["windows"] == 16 and 0 <= r["windows_worse"] <= 16
    with pytest.raises(ValueError):
        common.paired_rel_change([1.0], [1.0, 2.0])


def test_rate_distortion_pairs():
    def row(bits, chg):
        return {"bits": {"compressed_bits_per_value": bits}, "rel_change_pct": chg}

    rows = {"ecco2": row(2.0, 50.0), "ecco4": row(4.0, 1.0), "kivi3": row(4.0, 0.5),
            "int4": row(4.25, 2.0), "int2": row(2.25, 200.0), "kivi4": row(5.0, 0.1)}
    fails, checked = ppl.rate_distortion_failures(rows)
    assert len(checked) == 4  # int2 vs ecco2; kivi3, int4, kivi4 vs ecco4
    assert fails == [s for s in checked if "kivi3" in s or "kivi4" in s]


# ------------------------------------------------------------------ scoring functions


def test_agreement():
    assert common.agreement([1, 2, 3], [1, 2, 3]) == {
        "fraction": 1.0, "identical": 3, "length": 3, "first_divergence": None,
        "tokens_before_divergence": 3}
    a = common.agreement([1, 2, 3, 4], [1, 9, 3, 4])
    assert a["fraction"] == 0.75 and a["first_divergence"] == 1
    b = common.agreement([1, 2, 3, 4], [1, 2])  # stopped early: missing positions differ
    assert b["fraction"] == 0.5 and b["first_divergence"] == 2
    assert b["tokens_before_divergence"] == 2


def test_needle_scoring_and_insertion():
    assert common.contains_fact(" 985,440.", "985440")
    assert common.contains_fact("The passcode is 985440", "985440")
    assert not common.contains_fact(" 98544", "985440")
    assert not common.contains_fact("anything", "")
    assert needle.make_fact(0, 3) == needle.make_fact(0, 3) != needle.make_fact(0, 4)
    assert len(needle.make_fact(7, 0)) == 6
    t = "One. Two three. Four five six. Seven."
    out, pos = needle.insert_needle(t, "NEEDLE.", 0.3)
    assert out == "One. Two three. NEEDLE. Four five six. Seven."
    assert out[pos:].startswith("NEEDLE.")
    assert needle.insert_needle(t, "N.", 1.0)[0] == t + " N."
    with pytest.raises(ValueError):
        needle.insert_needle(t, "N.", 1.5)


def test_needle_summary_target():
    rows = [{"codec": c, "context": 100, "depth": d, "retrieved": r, "answer": "x"}
            for c, d, r in [("none", 0.1, True), ("none", 0.5, False), ("ecco4", 0.1, True),
                            ("ecco4", 0.5, True), ("int4", 0.1, False), ("int4", 0.5, False)]]
    s = needle.summarise(rows, ["none", "ecco4", "int4"], [100])
    assert s["accuracy"]["none"]["100"] == 0.5 and s["accuracy"]["int4"]["all"] == 0.0
    assert s["targets"][0]["met"] is False and "depth 0.5" in s["targets"][0]["detail"]
    assert {(d["codec"], d["depth"]) for d in s["differences"]} == {("ecco4", 0.5),
                                                                   ("int4", 0.1)}


# ------------------------------------------------------------------ end to end, tiny


def test_needle_and_agree_run_tiny(model, tmp_path):
    tok = tiny_tokenizer()
    head, tail = common.chat_split(tok, "w1 w2 w3", "what is the number?", answer_prefix="the")
    ids = tok("<|im_start|>user\nw1 w2 w3\n\nwhat is the number?<|im_end|>\n"
              "<|im_start|>assistant\nthe", add_special_tokens=False)["input_ids"]
    assert head + tail == ids
    assert common.stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    res = needle.run(model=model, tokenizer=tok, codecs=["ecco4"], contexts=[200, 300],
                     depths=[0.2, 0.8], max_new=3, out_dir=tmp_path, show_progress=False,
                     haystack=("random", text(400)), command="test")
    assert len(res["rows"]) == 2 * 2 * 2
    assert all(c["tokens"] <= ctx for c, ctx in zip(res["cases"], [200, 200, 300, 300],
                                                       strict=True))
    assert json.loads((tmp_path / "needle.json").read_text())["evaluation"] == "needle"
    assert "## Accuracy" in (tmp_path / "needle.md").read_text()
    res = agree.run(model=model, tokenizer=tok, codecs=["ecco4", "none"], prompts=2,
                    prompt_tokens=180, max_new=6, residual=16, out_dir=tmp_path,
                    show_progress=False, articles=[("a", text(300, 1)), ("b", text(300, 2))])
    s = res["summary"]
    assert s["none"]["agreement"] == 1.0 and s["none"]["identical_outputs"] == 2
    assert 0.0 <= s["ecco4"]["agreement"] <= 1.0
    assert s["none"]["teacher_forced_top1"] == 1.0
    assert 0.0 <= s["ecco4"]["teacher_forced_top1"] <= 1.0
    assert res["targets"][0]["target"].startswith("ecco4 agreement")
    assert json.loads((tmp_path / "agree.json").read_text())["summary"]["none"]["prompts"] == 2
    assert "## Summary" in (tmp_path / "agree.md").read_text()


def test_memory_report_writer(tmp_path):
    base = {"article": "A", "prompt_tokens": 7000, "new_tokens": 32,
            "peak_rss_after_load_bytes": 2**30, "VmRSS_after_load": 2**29, "cache_tokens": 7032,
            "prefill_s": 1.0, "decode_s_per_token": 0.1, "generated_ids": [1, 2]}
    rows = [dict(base, kind="dynamic", peak_rss_bytes=2 * 2**30, kv_bytes=300 * 2**20,
                 fp16_bytes=150 * 2**20),
            dict(base, kind="ecco4", peak_rss_bytes=int(1.7 * 2**30), kv_bytes=40 * 2**20,
                 fp16_bytes=150 * 2**20)]
    by = {r["kind"]: r for r in rows}
    t = memory.check_targets(by)
    assert t[0]["met"] is True and "-307 MiB" in t[0]["detail"]
    res = {"command": "test", "model": {"name": "m"}, "data": {"prompt_tokens": 7000,
                                                                "description": "d"},
           "protocol": {"chunk": 1024, "new_tokens": 32}, "environment": common.environment(),
           "rows": rows, "targets": t, "seconds": 1.0}
    md = memory.to_markdown(res)
    assert "| ecco4 |" in md and "met" in md
    common.write_reports(res, md, tmp_path, "memory")
    assert json.loads((tmp_path / "memory.json").read_text())["rows"][1]["kind"] == "ecco4"


def test_kv_bytes_dynamic_and_ecco(model):
    kv, _ = common.exact_prefill(model, windows(1, 300))
    d = memory.kv_bytes(common.replay(DynamicCache(config=model.config), kv))
    assert d == {"kv_bytes": 2 * 2 * 300 * 32 * 4, "fp16_bytes": 2 * 2 * 300 * 32 * 2}
    e = memory.kv_bytes(common.replay(EccoCache(model.config, "ecco4", residual_length=0), kv))
    assert e["fp16_bytes"] == d["fp16_bytes"] and e["kv_bytes"] < d["kv_bytes"]


def test_cli_parses_eval_commands():
    from eccokv.cli import build_parser

    p = build_parser()
    a = p.parse_args(["eval", "ppl", "--codecs", "none,ecco4", "--residual", "128,0", "--json"])
    assert a.fn.__name__ == "cmd_eval_ppl" and a.windows == ppl.DEFAULT_WINDOWS
    for sub in ("needle", "agree", "memory"):
        assert p.parse_args(["eval", sub]).fn.__name__ == f"cmd_eval_{sub}"


def test_needle_compressed_span(model):
    # 4 exact sink tokens, then whole groups of 128 older than the 16-token window
    assert needle.compressed_span("ecco4", model.config, 16, 300) == (4, 260)
    assert needle.compressed_span("kivi4", model.config, 16, 300) == (4, 260)
    assert needle.compressed_span("dynamic", model.config, 16, 300) is None
