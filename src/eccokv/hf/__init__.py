"""transformers integration: everything here may import transformers (lazily, on use).

- `eccokv.hf.cache`: `EccoCache`, the drop-in compressed KV cache (`EccoLayer` per layer).
- `eccokv.hf.spec`: codec + grouping axis per layer and per K/V stream; cache presets.
- `eccokv.hf.attention`: the "eccokv" attention implementation (fused kernels).
- `eccokv.hf.capture`: run a forward pass and read back the K/V a DynamicCache stores.
"""
