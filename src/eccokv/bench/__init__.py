"""Benchmarks: codec rate/error/speed (more to come: attention, generation)."""
