"""Quality evaluations of KV-cache codecs against baselines (`eccokv eval ...`).

One module per evaluation, each with `run(...) -> dict` (the result, also written as
JSON + Markdown under `benchmarks/`) and `to_markdown(result) -> str`:

- `ppl`: perplexity with the scored tokens attending to a compressed context, paired
  over the same windows for every codec, with a bootstrap spread and bits/value;
  transformers' own `QuantizedCache` (quanto backend) in the same table.
- `needle`: retrieval of a seeded fact hidden at several depths of long Wikipedia text.
- `agree`: greedy-generation agreement with the uncompressed cache.
- `memory`: peak RSS of a long generation, EccoCache vs DynamicCache, each in its own
  fresh process.
- `weights`: models with compressed weights (`eccokv.weights`) against RTN int4, HQQ and
  optimum-quanto: SmolLM2 perplexity, MiniLM embedding agreement, memory and speed.

`common` holds what they share: cache construction by name, bits/value accounting, the
exact-prefill replay, greedy decoding, the bootstrap, provenance and report writing.
"""

from __future__ import annotations

EVALUATIONS = ("ppl", "needle", "agree", "memory", "weights")

__all__ = ["EVALUATIONS"]
