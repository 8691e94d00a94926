"""transformers integration of compressed weights: `EccoQuantConfig` and its quantizer.

Registered under the quantization method "eccokv" when `eccokv.weights` is imported
(with transformers installed):

- compress at load: `AutoModelForCausalLM.from_pretrained(path,
  quantization_config=EccoQuantConfig(codec="ecco4"))` loads the float checkpoint, then
  calls `compress_model` (calibration: token-id lists, or None);
- compressed checkpoints: `model.save_pretrained(dir)` of a compressed model (either way;
  a model compressed by `compress_model` gets its config and quantizer from
  `attach_quant_config`) writes the uint8 block buffers (`<layer>.w_<array>`), the biases
  and the rest of the model as safetensors; `config.json`'s `quantization_config` holds the
  format name and version, every EccoLinear's `compressed_spec()` and a blake2b checksum
  of each layer's buffers. `from_pretrained(dir)` (no quantization_config argument)
  replaces the named nn.Linear layers of the skeleton by empty EccoLinear layers built
  from the specs (after checking each spec against its codec and the stored tensors'
  shapes), lets transformers load the buffers, then verifies every checksum and decodes
  every block once (`EccoLinear.check()`).

Everything read from a checkpoint is untrusted: specs are checked field by field, codec
configs go through `codecs.get` (which resolves only shipped profile names and registered
table hashes, never a path), and every failure raises `CodecError` (a ValueError) naming
the layer and what is wrong. See docs/weights.md.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from eccokv import codecs
from eccokv.codecs.base import DTYPE_BY_NAME, CodecError, Compressed
from eccokv.weights.linear import EccoLinear

FORMAT = "eccokv-weights"
FORMAT_VERSION = 1
QUANT_METHOD = "eccokv"

try:  # transformers is an optional dependency (the "hf" extra)
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    HAVE_TRANSFORMERS = True
except ImportError:  # pragma: no cover - exercised only without transformers
    HAVE_TRANSFORMERS = False

    class QuantizationConfigMixin:  # type: ignore[no-redef]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError("EccoQuantConfig needs transformers (pip install eccokv[hf])")

    class HfQuantizer:  # type: ignore[no-redef]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError("the eccokv quantizer needs transformers (pip install eccokv[hf])")


# ------------------------------------------------------------------------------ checksums
def layer_checksum(layer: EccoLinear) -> str:
    """blake2b-128 (hex) over a layer's compressed buffers: for each array (sorted by
    name) its name, byte count and bytes. Biases are not covered (float parameters that
    a load may cast); transformers loads them like any other parameter."""
    h = hashlib.blake2b(digest_size=16, person=b"eccokv-w1")
    for name in sorted(layer.array_specs):
        buf = getattr(layer, f"w_{name}")
        if buf.device.type == "meta":
            raise CodecError(f"compressed buffer w_{name} was never loaded (still on the meta "
                             "device): the checkpoint lacks it")
        raw = buf.detach().cpu().contiguous().numpy().reshape(-1)
        h.update(name.encode() + b"\0" + int(raw.size).to_bytes(8, "little"))
        h.update(raw.tobytes())
    return h.hexdigest()


def ecco_layers(model: nn.Module) -> dict[str, EccoLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, EccoLinear)}


# -------------------------------------------------------------------------- spec checking
def _expected_arrays(codec: codecs.Codec, spec: dict[str, Any],
                     dtype: torch.dtype) -> dict[str, tuple[str, tuple[int, ...]]]:
    n = int(spec["in_features"]) * int(spec["out_features"])
    names = spec["arrays"]
    probe = Compressed(codec.get_config(), (n,), dtype, 0,
                       {k: np.empty(0, np.uint8) for k in names}, dict(spec.get("meta") or {}))
    return {k: (np.dtype(d).str, tuple(int(s) for s in shp))
            for k, (d, shp) in codec.expected_arrays(probe).items()}


def validate_spec(name: str, spec: Any, linear: nn.Module | None = None) -> dict[str, Any]:
    """Check one layer's spec from a checkpoint config (untrusted) and return it: field
    types, sizes against the model's nn.Linear `linear`, the codec (built with
    `codecs.get`), and the arrays against what that codec stores for that many weights.
    Raises CodecError naming the layer."""
    where = f"eccokv checkpoint, layer {name!r}"
    if not isinstance(spec, dict):
        raise CodecError(f"{where}: spec must be a dict, got {type(spec).__name__}")
    keys = {"in_features", "out_features", "bias", "codec", "dtype", "arrays"}
    if missing := sorted(keys - set(spec)):
        raise CodecError(f"{where}: spec lacks {', '.join(missing)}")
    for k in ("in_features", "out_features"):
        v = spec[k]
        if type(v) is not int or not 0 < v <= 1 << 40:
            raise CodecError(f"{where}: {k} must be a positive int, got {v!r}")
    if type(spec["bias"]) is not bool:
        raise CodecError(f"{where}: bias must be true/false, got {spec['bias']!r}")
    if spec["dtype"] not in DTYPE_BY_NAME:
        raise CodecError(f"{where}: unsupported weight dtype {spec['dtype']!r}")
    meta = spec.get("meta") or {}
    if not isinstance(meta, dict):
        raise CodecError(f"{where}: meta must be a dict, got {type(meta).__name__}")
    if linear is not None:
        if not isinstance(linear, nn.Linear):
            raise CodecError(f"{where}: the model has no nn.Linear there (found "
                             f"{type(linear).__name__})")
        have = (linear.in_features, linear.out_features, linear.bias is not None)
        want = (spec["in_features"], spec["out_features"], spec["bias"])
        if have != want:
            raise CodecError(f"{where}: spec says in={want[0]} out={want[1]} bias={want[2]}, "
                             f"the model's layer is in={have[0]} out={have[1]} bias={have[2]}")
    cfg = spec["codec"]
    if not isinstance(cfg, dict) or not isinstance(cfg.get("id"), str):
        raise CodecError(f"{where}: codec must be a config dict with a string 'id', got "
                         f"{cfg!r}")
    try:
        codec = codecs.get(dict(cfg))
    except (KeyError, TypeError, ValueError) as e:  # CodecError is a ValueError
        msg = e.args[0] if e.args else e
        raise CodecError(f"{where}: unknown or invalid codec {cfg!r}: {msg}") from None
    if codec.get_config() != cfg:
        raise CodecError(f"{where}: codec config {cfg!r} is not in canonical form "
                         f"({codec.get_config()!r})")
    arrays = spec["arrays"]
    if not isinstance(arrays, dict) or not all(isinstance(k, str) for k in arrays):
        raise CodecError(f"{where}: arrays must map names to [dtype, shape]")
    got: dict[str, tuple[str, tuple[int, ...]]] = {}
    for k, v in arrays.items():
        ok = (isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], str)
              and isinstance(v[1], (list, tuple))
              and all(type(s) is int and s >= 0 for s in v[1]))
        if not ok:
            raise CodecError(f"{where}: array {k!r} must be [dtype, shape], got {v!r}")
        try:
            dt = np.dtype(v[0])
        except TypeError:
            raise CodecError(f"{where}: array {k!r} has an invalid dtype {v[0]!r}") from None
        got[k] = (dt.str, tuple(v[1]))
    try:
        want_arrays = _expected_arrays(codec, spec, DTYPE_BY_NAME[spec["dtype"]])
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"{where}: spec does not fit codec {cfg.get('id')!r}: {e}") from None
    if got != want_arrays:
        raise CodecError(f"{where}: spec arrays {got} do not match what codec "
                         f"{cfg.get('id')!r} stores for {spec['out_features']} x "
                         f"{spec['in_features']} weights: {want_arrays}")
    return spec


def buffer_nbytes(spec: dict[str, Any]) -> dict[str, int]:
    """Bytes of each uint8 buffer `w_<name>` a (validated) spec describes."""
    return {k: np.dtype(d).itemsize * math.prod(shp) for k, (d, shp) in spec["arrays"].items()}


def _checkpoint_shapes(files: Sequence[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key -> (safetensors dtype, shape) from the headers of the checkpoint files."""
    from safetensors import safe_open

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            raise CodecError(f"eccokv checkpoint: {os.path.basename(f)} is not a safetensors "
                             "file (compressed checkpoints are safetensors only)")
        try:
            with safe_open(f, framework="pt", device="cpu") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
        except CodecError:
            raise
        except Exception as e:  # SafetensorError and OSError: truncated or damaged files
            raise CodecError(f"eccokv checkpoint: cannot read {os.path.basename(f)} "
                             f"({type(e).__name__}: {e}); the file is truncated or "
                             "corrupt") from None
    return out


# ---------------------------------------------------------------------------------- config
def _calibration_lists(calibration: Any) -> list[list[int]] | None:
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise TypeError("calibration must be a non-empty list of token-id lists")
    out = []
    for i, ids in enumerate(calibration):
        if isinstance(ids, torch.Tensor):
            if ids.dtype not in (torch.int64, torch.int32) or ids.dim() > 2:
                raise TypeError(f"calibration[{i}] must be an integer tensor of token ids")
            ids = ids.reshape(-1).tolist()
        if (not isinstance(ids, (list, tuple)) or not ids
                or not all(type(t) is int and t >= 0 for t in ids)):
            raise TypeError(f"calibration[{i}] must be a non-empty list of token ids (ints)")
        out.append(list(ids))
    return out


class EccoQuantConfig(QuantizationConfigMixin):
    """Quantization config of eccokv compressed weights (quant_method "eccokv").

    Compress at load: `codec` (a preset name such as "ecco4" or "int4", or a config dict;
    Ecco presets get the shipped weights profile, as in `compress_model`), `skip`
    (fnmatch patterns of Linear names to keep; None: the LM head), `calibration` (a list
    of token-id lists, or None: every input channel weighted equally; not written to
    config.json). A saved checkpoint's config also carries `format`, `format_version`,
    `layers` ({name: compressed_spec()}) and `checksums` ({name: blake2b hex})."""

    def __init__(self, codec: str | dict[str, Any] = "ecco4", skip: Sequence[str] | None = None,
                 calibration: Any = None, format: str = FORMAT,
                 format_version: int = FORMAT_VERSION, layers: dict[str, Any] | None = None,
                 checksums: dict[str, str] | None = None, activation_aware: bool = False,
                 quant_method: str = QUANT_METHOD, **kwargs: Any) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"EccoQuantConfig has quant_method {QUANT_METHOD!r}, got "
                             f"{quant_method!r}")
        if format != FORMAT:
            raise ValueError(f"eccokv quantization_config: unknown format {format!r} "
                             f"(expected {FORMAT!r})")
        if type(format_version) is not int or format_version != FORMAT_VERSION:
            raise ValueError(f"eccokv quantization_config: format_version {format_version!r} "
                             f"is not supported (this eccokv reads version {FORMAT_VERSION})")
        if not isinstance(codec, (str, dict)):
            raise TypeError(f"codec must be a preset name or a config dict, got "
                            f"{type(codec).__name__}")
        if skip is not None and (isinstance(skip, str) or not all(isinstance(s, str)
                                                                   for s in skip)):
            raise TypeError("skip must be a list of fnmatch patterns (strings)")
        if layers is not None and not isinstance(layers, dict):
            raise CodecError("eccokv quantization_config: layers must be a dict")
        if checksums is not None and not isinstance(checksums, dict):
            raise CodecError("eccokv quantization_config: checksums must be a dict")
        self.quant_method = QUANT_METHOD
        self.format = format
        self.format_version = format_version
        self.codec = codec
        self.skip = None if skip is None else list(skip)
        self.calibration = _calibration_lists(calibration)
        self.activation_aware = bool(activation_aware)
        self.layers = layers
        self.checksums = checksums
        self.extra = dict(kwargs)  # unknown keys of a newer writer, kept and rewritten

    def to_dict(self) -> dict[str, Any]:
        import copy

        d = {"quant_method": QUANT_METHOD, "format": self.format,
             "format_version": self.format_version, "codec": self.codec, "skip": self.skip,
             "activation_aware": self.activation_aware, "layers": self.layers,
             "checksums": self.checksums}
        return copy.deepcopy({**self.extra, **d})

    def __iter__(self):
        yield from self.to_dict().items()

    def refresh(self, model: nn.Module) -> None:
        """Record the specs and checksums of `model`'s EccoLinear layers (called before
        every save, so config.json always matches the buffers written)."""
        layers = ecco_layers(model)
        info = getattr(model, "eccokv_weights", None)
        if isinstance(info, dict) and "codec" in info:
            self.codec, self.skip = info["codec"], info.get("skip", self.skip)
        self.layers = {n: m.compressed_spec() for n, m in layers.items()}
        self.checksums = {n: layer_checksum(m) for n, m in layers.items()}
        self.activation_aware = any(m.activation_aware for m in layers.values())


# ------------------------------------------------------------------------------- quantizer
class EccoHfQuantizer(HfQuantizer):
    """transformers quantizer for eccokv weights (see the module docstring)."""

    requires_calibration = False
    quantization_config: EccoQuantConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict):
            devs = {str(d) for d in device_map.values()}
            if devs - {"cpu"}:
                raise ValueError(f"eccokv compressed weights run on the CPU only; device_map "
                                 f"has {sorted(devs)}")
        elif device_map not in (None, "cpu") and str(device_map) != "cpu":
            raise ValueError(f"eccokv compressed weights run on the CPU only; got device_map="
                             f"{device_map!r}")

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if not self.pre_quantized:
            return model  # compress after the float weights are loaded
        cfg = self.quantization_config
        if not cfg.layers:
            raise CodecError("eccokv checkpoint: quantization_config names no compressed "
                             "layers (was it saved before compression?)")
        checksums = cfg.checksums or {}
        if set(checksums) != set(cfg.layers):
            raise CodecError("eccokv checkpoint: quantization_config's checksums do not "
                             f"cover the same layers as its specs ({len(checksums)} "
                             f"checksums, {len(cfg.layers)} layers)")
        files = kwargs.get("checkpoint_files")
        stored = _checkpoint_shapes(files) if files else None
        mods = dict(model.named_modules())
        for name, spec in cfg.layers.items():
            if not isinstance(name, str) or not name or name not in mods:
                raise CodecError(f"eccokv checkpoint: layer {name!r} is not a module of "
                                 f"{type(model).__name__}")
            if not isinstance(checksums[name], str):
                raise CodecError(f"eccokv checkpoint, layer {name!r}: checksum must be a "
                                 "hex string")
            validate_spec(name, spec, mods[name])
            if stored is not None:
                for arr, nbytes in buffer_nbytes(spec).items():
                    key = f"{name}.w_{arr}"
                    if key not in stored:
                        raise CodecError(f"eccokv checkpoint: no tensor {key!r} in the "
                                         "safetensors files (incomplete checkpoint)")
                    if stored[key] != ("U8", (nbytes,)):
                        raise CodecError(f"eccokv checkpoint: tensor {key!r} is "
                                         f"{stored[key][0]} {list(stored[key][1])}, the "
                                         f"layer's spec needs U8 [{nbytes}]")
            with torch.device("cpu"):  # the codec is built on real tensors, buffers below
                layer = EccoLinear.from_spec(spec)
            layer.to("meta")  # the skeleton is on the meta device; loading fills it
            parent_name, _, attr = name.rpartition(".")
            setattr(mods[parent_name] if parent_name else model, attr, layer)
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        cfg = self.quantization_config
        if not self.pre_quantized:
            from eccokv.weights.compress import compress_model

            cal = cfg.calibration
            cal_t = None if cal is None else [torch.tensor(c, dtype=torch.long) for c in cal]
            compress_model(model, cfg.codec, calibration=cal_t, skip=cfg.skip)
        else:
            layers = ecco_layers(model)
            if set(layers) != set(cfg.layers):
                raise CodecError("eccokv checkpoint: the loaded model's compressed layers "
                                 "differ from the config's")
            for name, layer in layers.items():
                got = layer_checksum(layer)
                if got != cfg.checksums[name]:
                    raise CodecError(f"eccokv checkpoint, layer {name!r}: checksum mismatch "
                                     f"(stored {cfg.checksums[name]}, computed {got}): its "
                                     "compressed weights are corrupt")
                try:
                    layer.check()
                except CodecError as e:
                    raise CodecError(f"eccokv checkpoint, layer {name!r}: {e}") from None
            model.eccokv_weights = {"codec": cfg.codec, "skip": cfg.skip,
                                    "activation_aware": cfg.activation_aware}
        cfg.refresh(model)
        return model

    def get_state_dict_and_metadata(self, model: Any) -> tuple[None, dict[str, str]]:
        self.quantization_config.refresh(model)
        model.config.quantization_config = self.quantization_config
        return None, {"eccokv": f"{FORMAT}/{FORMAT_VERSION}"}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def attach_quant_config(model: nn.Module) -> nn.Module:
    """Give a model compressed by `compress_model` the quantization config and quantizer
    that make `model.save_pretrained(dir)` write an eccokv checkpoint (idempotent; a no-op
    for models that are not transformers PreTrainedModels or without transformers)."""
    if not HAVE_TRANSFORMERS or not hasattr(model, "config") or not hasattr(
            model, "save_pretrained"):
        return model
    info = getattr(model, "eccokv_weights", None) or {}
    q = getattr(model, "hf_quantizer", None)
    if isinstance(q, EccoHfQuantizer):
        cfg = q.quantization_config
    elif q is not None:
        raise ValueError(f"the model is already quantized with "
                         f"{q.quantization_config.quant_method!r}")
    else:
        cfg = EccoQuantConfig(codec=info.get("codec", "ecco4"), skip=info.get("skip"))
        q = EccoHfQuantizer(cfg, pre_quantized=True)
        model.hf_quantizer = q
    cfg.refresh(model)
    model.config.quantization_config = cfg
    return model


if HAVE_TRANSFORMERS:
    # Registered once per process (a re-import must not raise "already registered").
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(EccoQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(EccoHfQuantizer)

__all__ = ["FORMAT", "FORMAT_VERSION", "EccoHfQuantizer", "EccoQuantConfig",
           "attach_quant_config", "layer_checksum", "validate_spec"]
