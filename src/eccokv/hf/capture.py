"""Read real K/V out of a transformers model: one forward pass into a DynamicCache.

The tensors are exactly what the cache stores: keys after RoPE, values as projected, one
(K, V) pair per layer, shaped [batch, n_kv_heads, seq, head_dim]. For layers with a
sliding window (Gemma, Mistral configs that set one) the cache keeps only the last
window of tokens, and so does this.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["KV", "capture_kv", "kv_samples"]

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V)


def capture_kv(model: Any, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> KV:
    """Per-layer (K, V), float32 on the CPU, from a forward pass over `input_ids` [batch, seq]."""
    from transformers import DynamicCache

    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "past_key_values": cache,
                              "use_cache": True}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(device)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the logits are not needed: skip the big LM-head matmul
    with torch.no_grad():
        out = model(**kwargs)
    if getattr(out, "past_key_values", None) is not None:
        cache = out.past_key_values
    kv = []
    for i, layer in enumerate(cache.layers):
        if layer.keys is None or layer.values is None or layer.keys.numel() == 0:
            raise ValueError(f"layer {i} of the cache holds no K/V (shared or skipped layer); "
                             "capture_kv needs a model whose every layer caches its own K/V")
        kv.append((layer.keys.detach().to("cpu", torch.float32),
                   layer.values.detach().to("cpu", torch.float32)))
    return kv


def kv_samples(model: Any, tokenizer: Any, corpus: str = "wiki", tokens: int = 2048,
               windows: int = 1, offset: int = 0) -> KV:
    """Per-layer (K, V) [windows, n_kv_heads, tokens, head_dim] on real text.

    The windows come from `eccokv.data.token_windows` (deterministic, non-overlapping);
    each is a separate forward pass (bounded memory), stacked on the batch axis.
    """
    from eccokv.data import token_windows

    ids = token_windows(tokenizer, corpus, window=tokens, n=windows, offset=offset)
    per_window = [capture_kv(model, ids[w : w + 1]) for w in range(windows)]
    if windows == 1:
        return per_window[0]
    return [(torch.cat([kv[i][0] for kv in per_window]), torch.cat([kv[i][1] for kv in per_window]))
            for i in range(len(per_window[0]))]
