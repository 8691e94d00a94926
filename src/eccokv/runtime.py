"""Process-wide numba settings eccokv chooses for itself at import (docs/runtime.md).

1. Compiled-kernel cache keyed by the kernel sources. numba checks a cached function only
   against its own source file, but eccokv's kernels inline functions from other modules
   (attention kernels inline the Ecco decoder), so editing one file could leave stale
   machine code of another in use. eccokv's jitted functions are therefore cached under
   `<cache>/numba/<key>/`, where key = sha256 of every eccokv source file that uses numba,
   plus the numba, llvmlite and Python versions and the CPU; any change to any of them
   selects a fresh folder (a compile). Only functions defined in eccokv's own files are
   redirected (a numba cache locator that claims nothing else), so other packages' numba
   caches stay where numba puts them. `NUMBA_CACHE_DIR` set by the user wins.
2. Threading layer: numba's "workqueue" layer aborts the process when two Python threads
   launch parallel kernels at once, so unless the user chose a layer (NUMBA_THREADING_LAYER
   or numba.config), eccokv asks for a thread-safe one: TBB (the `tbb` dependency, whose
   library eccokv loads so numba finds it), else OpenMP (numba's "threadsafe" choice).
3. OpenMP waits: unless the user set OMP_WAIT_POLICY, and if no OpenMP runtime is loaded
   yet (eccokv imported before torch), OMP_WAIT_POLICY=PASSIVE: waiting torch threads
   sleep instead of spinning on the cores numba's kernels need.

Everything here is idempotent and does nothing once numba has launched its threads.
"""

from __future__ import annotations

import ast
import getpass
import hashlib
import os
import platform
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parent
# What eccokv asks numba for when the user chose nothing (see docs/runtime.md).
DEFAULT_THREADING_LAYER = "threadsafe"

_state: dict[str, Any] = {"configured": False, "cache_dir": None, "key": None,
                          "threading_layer": None, "locator": False}


# A decorator that makes numba compile the function below it.
_JIT_DECORATOR = re.compile(
    rb"^[ \t]*@(?:numba\.)?(?:extending\.)?(?:njit|jit|intrinsic|overload\w*|vectorize|"
    rb"guvectorize|cfunc|stencil|register_jitable)\b", re.M)


def _eccokv_imports(data: bytes, root: Path) -> set[Path]:
    """Module files (not packages) of eccokv that a source imports at its top level: the
    constants and inlined helpers they provide are frozen into compiled code."""
    try:
        tree = ast.parse(data)
    except SyntaxError:
        return set()
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    out = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == root.name and len(parts) > 1:
            f = root.joinpath(*parts[1:]).with_suffix(".py")
            if f.is_file():
                out.add(f)
    return out


def kernel_sources(root: Path | None = None) -> dict[str, bytes]:
    """The .py files under eccokv's package `root` that define numba-compiled functions, and
    the eccokv modules they import at top level: relative path -> bytes."""
    root = PACKAGE_ROOT if root is None else Path(root)
    files: set[Path] = set()
    for f in root.rglob("*.py"):
        data = f.read_bytes()
        if "__pycache__" not in f.parts and _JIT_DECORATOR.search(data):
            files.add(f)
            files |= _eccokv_imports(data, root)
    return {f.relative_to(root).as_posix(): f.read_bytes()
            for f in sorted(files, key=lambda p: p.relative_to(root).as_posix())}


def cache_key(sources: dict[str, bytes] | None = None) -> str:
    """16 hex digits naming the kernel cache: sources, numba/llvmlite/Python versions, CPU."""
    import llvmlite
    import numba

    sources = kernel_sources() if sources is None else sources
    h = hashlib.sha256()
    for part in (numba.__version__, llvmlite.__version__, sys.version, platform.machine()):
        h.update(part.encode() + b"\0")
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + hashlib.sha256(sources[name]).digest())
    return h.hexdigest()[:16]


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def kernel_cache_root() -> Path | None:
    """The parent of the keyed cache folders: `<eccokv cache>/numba`, or a per-user folder
    under the temp dir if that is not writable; None if neither is."""
    from eccokv._paths import cache_dir

    candidates = []
    try:
        candidates.append(cache_dir() / "numba")
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else getpass.getuser()
    candidates.append(Path(tempfile.gettempdir()) / f"eccokv-numba-{uid}")
    for c in candidates:
        if _writable(c):
            return c
    return None


def _install_locator(cache_path: Path, key: str) -> bool:
    """Make numba cache functions defined in eccokv's files under `cache_path` (stamped with
    `key`). False if numba's caching internals are not what this expects."""
    try:
        from numba.core import caching
    except ImportError:  # pragma: no cover
        return False
    base = (getattr(caching, "_SourceFileBackedLocatorMixin", None),
            getattr(caching, "_CacheLocator", None))
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    if None in base or impl is None or not isinstance(
            getattr(impl, "_locator_classes", None), list):
        return False
    for cls in impl._locator_classes:
        if getattr(cls, "_eccokv", False):
            impl._locator_classes.remove(cls)
            break

    class EccoKernelLocator(*base):  # type: ignore[misc]
        """Caches eccokv's own jitted functions in the source-keyed folder."""

        _eccokv = True

        def __init__(self, py_func: Any, py_file: str) -> None:
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = os.path.join(cache_path, self.get_suitable_cache_subpath(py_file))

        def get_cache_path(self) -> str:
            return self._cache_path

        def get_source_stamp(self) -> Any:
            # every kernel source at once (the folder's key), and this file's own hash
            return key, super().get_source_stamp()

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            try:
                Path(py_file).resolve().relative_to(PACKAGE_ROOT)
            except (OSError, ValueError):
                return None  # not eccokv's: numba's own locators decide
            return super().from_function(py_func, py_file)

    impl._locator_classes.insert(0, EccoKernelLocator)
    return True


def configure_cache() -> Path | None:
    """Point eccokv's numba cache at `<root>/<cache_key()>` (once); returns that folder, or
    None when the user set NUMBA_CACHE_DIR or nothing is writable (numba's defaults)."""
    if _state["cache_dir"] is not None or os.environ.get("NUMBA_CACHE_DIR"):
        return _state["cache_dir"]
    root = kernel_cache_root()
    if root is None:
        return None
    key = cache_key()
    path = root / key
    installed = _install_locator(path, key)
    if not installed:
        import numba

        numba.config.CACHE_DIR = str(path)  # fallback: every package's numba cache moves
    _state.update(cache_dir=path, key=key, locator=installed)
    return path


def threads_launched() -> bool:
    """True once numba has started its thread pool (the layer can no longer change)."""
    mod = sys.modules.get("numba.np.ufunc.parallel")
    return bool(getattr(mod, "_is_initialized", False))


def _tbb_library() -> Path | None:
    """libtbb of the installed `tbb` package (pip puts it in <prefix>/lib, which the
    dynamic loader does not search, so numba would not find it by itself)."""
    import importlib.metadata as md

    try:
        files = md.files("tbb") or []
    except md.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("libtbb.so.12") or f.name in ("libtbb.12.dylib", "tbb12.dll"):
            p = Path(str(f.locate())).resolve()
            if p.is_file():
                return p
    return None


def _preload_tbb() -> bool:
    """Load the `tbb` package's libtbb globally, so numba's TBB layer finds it by name."""
    import ctypes

    lib = _tbb_library()
    if lib is None:
        return False
    try:
        ctypes.CDLL(str(lib), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
    except OSError:
        return False
    return True


def configure_threading() -> str | None:
    """Ask numba for a thread-safe layer (TBB if the `tbb` package loads, else OpenMP)
    unless the user chose one; returns what numba was told (None: left alone)."""
    import numba

    if threads_launched():
        return None
    _state["tbb_preloaded"] = _preload_tbb()  # also when the user asked for "tbb"
    if "NUMBA_THREADING_LAYER" in os.environ:
        return None
    if str(numba.config.THREADING_LAYER).lower() != "default":
        return None  # set in code or in a .numba_config.yaml
    numba.config.THREADING_LAYER = DEFAULT_THREADING_LAYER
    _state["threading_layer"] = DEFAULT_THREADING_LAYER
    return DEFAULT_THREADING_LAYER


def _libgomp_loaded() -> bool:
    """True if GNU OpenMP is already loaded in this process (it read OMP_WAIT_POLICY then)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return "libgomp" in f.read()
    except OSError:
        return "torch" in sys.modules


def configure_openmp() -> str:
    """Make OpenMP threads (torch's, and numba's OpenMP layer) sleep when they wait, unless
    the user set OMP_WAIT_POLICY: spinning waiters stole the cores numba's kernels needed
    (docs/runtime.md). libgomp reads the variable once, when it loads (with torch), so this
    only works if eccokv is imported before torch. Returns the policy in effect."""
    if "OMP_WAIT_POLICY" in os.environ:
        how = "user" if not _state.get("omp_set") else "eccokv"
    elif _libgomp_loaded():
        how = "default (OpenMP was loaded before eccokv: set OMP_WAIT_POLICY=PASSIVE)"
        warnings.warn(
            "eccokv: torch (OpenMP) was imported before eccokv with OMP_WAIT_POLICY unset, so "
            "its threads spin while they wait; on a busy machine that made decode steps with "
            "eccokv's kernels up to 11x slower (docs/runtime.md). Import eccokv before torch, "
            "or set OMP_WAIT_POLICY=PASSIVE (any value silences this).",
            RuntimeWarning, stacklevel=4)
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _state["omp_set"] = True
        how = "eccokv"
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    _state["omp_wait_policy"] = f"{policy} ({how})" if policy != "unset" else how
    return _state["omp_wait_policy"]


def configure() -> None:
    """Apply eccokv's settings (OpenMP waits, numba cache folder, threading layer); safe to
    call again."""
    if _state["configured"]:
        return
    _state["configured"] = True
    configure_openmp()  # before anything here can load an OpenMP runtime
    try:
        import numba

        numba.config.reload_config()  # absorb NUMBA_* set since numba's import first
    except ImportError:  # pragma: no cover
        return
    configure_cache()
    configure_threading()


def info() -> dict[str, Any]:
    """What `configure` chose, and the threading layer in use (None before the first
    parallel launch)."""
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = None
    return {"cache_dir": None if _state["cache_dir"] is None else str(_state["cache_dir"]),
            "cache_key": _state["key"], "numba_cache_dir_env": os.environ.get("NUMBA_CACHE_DIR"),
            "threading_layer_requested": str(numba.config.THREADING_LAYER),
            "threading_layer": layer, "numba_threads": numba.get_num_threads(),
            "omp_wait_policy": _state.get("omp_wait_policy"),
            "tbb_preloaded": _state.get("tbb_preloaded")}
