"""Read real K/V out of a transformers model: one forward pass into a DynamicCache.

The tensors are exactly what the cache stores: keys after RoPE, values as projected, one
(K, V) pair per layer, shaped [batch, n_kv_heads, seq, head_dim]. For layers with a
sliding window (Gemma, Mistral configs that set one) the cache keeps only the last
`sliding_window - 1` tokens, and so does this.

- `capture_kv(model, input_ids, chunk=None)`: one batch of ids -> per-layer (K, V); with
  `chunk` the prefill runs in pieces of that many tokens (less activation memory, same K/V).
- `iter_kv_samples(model, tokenizer, corpus, tokens, windows)`: K/V of real-text windows,
  one window at a time (bounded memory); `kv_samples` stacks them on the batch axis.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["KV", "capture_kv", "iter_kv_samples", "kv_samples"]

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V)


def capture_kv(model: Any, input_ids: torch.Tensor, chunk: int | None = None,
               attention_mask: torch.Tensor | None = None) -> KV:
    """Per-layer (K, V), float32 on the CPU, from a forward pass over `input_ids` [batch, seq].

    Each tensor is [batch, n_kv_heads, seq, head_dim]; on sliding-window layers only the
    last `sliding_window - 1` positions, as the cache keeps them. `chunk`: feed the
    sequence `chunk` tokens at a time into the same cache (chunked prefill); the stored
    K/V equal those of a single pass up to float rounding.
    """
    from transformers import DynamicCache

    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq>0], got shape {tuple(input_ids.shape)}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1 (or None), got {chunk}")
    seq = input_ids.shape[1]
    step = seq if chunk is None else chunk
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    cache = DynamicCache(config=model.config)
    skip_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    with torch.no_grad():
        for start in range(0, seq, step):
            end = min(start + step, seq)
            kwargs: dict[str, Any] = {"input_ids": input_ids[:, start:end],
                                      "past_key_values": cache, "use_cache": True}
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask[:, :end]  # past + this chunk
            if skip_logits:
                kwargs["logits_to_keep"] = 1  # no logits needed: skip most of the LM head
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


def iter_kv_samples(model: Any, tokenizer: Any, corpus: str = "wiki", tokens: int = 2048,
                    windows: int = 1, offset: int = 0, seed: int | None = None,
                    chunk: int | None = None) -> Iterator[KV]:
    """Per-layer (K, V) [1, n_kv_heads, tokens, head_dim] for each real-text window in turn.

    The windows are `eccokv.data.token_windows(tokenizer, corpus, tokens, windows,
    seed=seed, offset=offset)`: deterministic and non-overlapping. One forward pass per
    window, produced lazily, so only one window's K/V needs to be held at a time.
    """
    from eccokv.data import token_windows

    ids = token_windows(tokenizer, corpus, window=tokens, n=windows, seed=seed, offset=offset)
    for w in range(windows):
        yield capture_kv(model, ids[w : w + 1], chunk=chunk)


def kv_samples(model: Any, tokenizer: Any, corpus: str = "wiki", tokens: int = 2048,
               windows: int = 1, offset: int = 0, seed: int | None = None,
               chunk: int | None = None) -> KV:
    """`iter_kv_samples` stacked on the batch axis: per-layer (K, V) [windows, heads, tokens, d]."""
    per_window = list(iter_kv_samples(model, tokenizer, corpus, tokens, windows, offset=offset,
                                      seed=seed, chunk=chunk))
    if windows == 1:
        return per_window[0]
    return [(torch.cat([kv[i][0] for kv in per_window]), torch.cat([kv[i][1] for kv in per_window]))
            for i in range(len(per_window[0]))]
