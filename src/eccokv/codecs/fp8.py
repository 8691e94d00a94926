"""(fp8: being written)."""
