"""(intq: being written)."""
