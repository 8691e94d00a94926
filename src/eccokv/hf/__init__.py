"""transformers integration: everything here may import transformers (lazily, on use).

- `eccokv.hf.capture`: run a forward pass and read back the K/V a DynamicCache stores.
"""
