"""Ecco block codec (being written)."""
