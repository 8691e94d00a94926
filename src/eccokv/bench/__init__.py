"""Benchmarks, each writing `benchmarks/<name>.{json,md}` with its provenance (command,
packages, machine, source digest): `codec` (rate, error, speed of every codec), `profiles`
(generic vs model-specific Ecco profiles), `attention` (one decode step over a compressed
cache: fused kernels vs decode-then-SDPA, torch and transformers' QuantizedCache) and
`generate` (generate() tokens/s, prefill and KV bytes: EccoCache vs DynamicCache and
QuantizedCache, fresh process per run)."""
