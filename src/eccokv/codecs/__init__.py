"""Codec registry: `get(name_or_config)`, `available()`, `from_bytes(b)`.

Adding a codec = one new module defining a `Codec` subclass decorated with `@register`,
plus one line in `_MODULES` below (and optional named presets in `PRESETS`). Tests
parametrise over `available()`, so a new codec is tested as soon as it is registered.
"""

from __future__ import annotations

import importlib
from typing import Any

from eccokv.codecs.base import Codec, CodecError, Compressed, Layout

_FAMILIES: dict[str, type[Codec]] = {}

# Registry entries: modules that define codec families (imported on first use).
_MODULES = (
    "eccokv.codecs.none",
    "eccokv.codecs.fp8",
    "eccokv.codecs.intq",
    "eccokv.codecs.ecco",
    "eccokv.codecs.ecco_eb",
)

# Named presets: name -> config. `get(name)` builds the codec from this config.
PRESETS: dict[str, dict[str, Any]] = {
    "none": {"id": "none"},
    "fp8": {"id": "fp8"},
    "int2": {"id": "int", "bits": 2, "group_size": 128},
    "int3": {"id": "int", "bits": 3, "group_size": 128},
    "int4": {"id": "int", "bits": 4, "group_size": 128},
    "int8": {"id": "int", "bits": 8, "group_size": 128},
    "kivi2": {"id": "int", "bits": 2, "group_size": 32},
    "kivi3": {"id": "int", "bits": 3, "group_size": 32},
    "kivi4": {"id": "int", "bits": 4, "group_size": 32},
    "ecco2": {"id": "ecco", "variant": "ecco2"},
    "ecco3": {"id": "ecco", "variant": "ecco3"},
    "ecco4": {"id": "ecco", "variant": "ecco4"},
    # error-bounded, variable rate: a bits/value target, or a bound (relative to the range)
    "eb2": {"id": "ecco-eb", "target_bits": 2.0},
    "eb2.5": {"id": "ecco-eb", "target_bits": 2.5},
    "eb3": {"id": "ecco-eb", "target_bits": 3.0},
    "eb4": {"id": "ecco-eb", "target_bits": 4.0},
    "eb-rel0.05": {"id": "ecco-eb", "bound": 0.05, "bound_mode": "relative"},
    "eb-abs0.05": {"id": "ecco-eb", "bound": 0.05, "bound_mode": "absolute"},
}

_loaded = False


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: register a codec family under its `codec_id`."""
    cid = getattr(cls, "codec_id", None)
    if not isinstance(cid, str) or not cid:
        raise TypeError(f"{cls.__name__} must define a non-empty string codec_id")
    if cid in _FAMILIES and _FAMILIES[cid] is not cls:
        raise ValueError(f"codec id {cid!r} is already registered by {_FAMILIES[cid].__name__}")
    _FAMILIES[cid] = cls
    return cls


def _load() -> None:
    global _loaded
    if not _loaded:
        for mod in _MODULES:
            importlib.import_module(mod)
        _loaded = True


def available() -> list[str]:
    """Names accepted by `get`: every preset (each registered family has at least one)."""
    _load()
    return [n for n, cfg in PRESETS.items() if cfg["id"] in _FAMILIES]


def families() -> dict[str, type[Codec]]:
    _load()
    return dict(_FAMILIES)


def get(name_or_config: str | dict[str, Any] | Codec) -> Codec:
    """Build a codec from a preset name ("ecco4"), a config dict ({"id": "int", ...}) or
    return a Codec unchanged. A config's "id" may be a family or a preset name, whose
    settings the other keys override."""
    _load()
    if isinstance(name_or_config, Codec):
        return name_or_config
    if isinstance(name_or_config, str):
        if name_or_config not in PRESETS:
            raise KeyError(
                f"unknown codec {name_or_config!r}; available: {', '.join(available())}"
            )
        cfg = dict(PRESETS[name_or_config])
    elif isinstance(name_or_config, dict):
        cfg = dict(name_or_config)
        cid = cfg.get("id")
        if not isinstance(cid, str):
            raise KeyError(f"codec config needs a string 'id', got {name_or_config!r}")
        if cid in PRESETS and cid not in _FAMILIES:
            base = dict(PRESETS[cid])
            cfg.pop("id")
            base.update(cfg)
            cfg = base
    else:
        raise TypeError(
            f"codec must be a name, a config dict or a Codec, got {type(name_or_config).__name__}"
        )
    fam = _FAMILIES.get(cfg["id"])
    if fam is None:
        raise KeyError(
            f"unknown codec id {cfg['id']!r}; families: {', '.join(sorted(_FAMILIES))}"
        )
    return fam.from_config(cfg)


def from_config(config: dict[str, Any]) -> Codec:
    return get(config)


def from_bytes(b: bytes | bytearray | memoryview) -> Compressed:
    """Parse bytes written by `Compressed.to_bytes()`; raises CodecError (a ValueError)."""
    from eccokv.codecs.serialize import from_bytes as _fb

    return _fb(b)


def decode_bytes(b: bytes | bytearray | memoryview) -> Any:
    """Decode self-contained bytes straight to a tensor using the codec they name."""
    c = from_bytes(b)
    return get(c.codec_config).decode(c)


__all__ = [
    "Codec",
    "CodecError",
    "Compressed",
    "Layout",
    "PRESETS",
    "available",
    "decode_bytes",
    "families",
    "from_bytes",
    "from_config",
    "get",
    "register",
]
