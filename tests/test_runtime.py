"""eccokv.runtime: the numba cache keyed by the kernel sources, and the threading layer
eccokv picks in a process started with no environment settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import eccokv
from eccokv import runtime

SRC = Path(eccokv.__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    """The environment of a plain user process: no NUMBA_* / OMP_* settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NUMBA_", "OMP_", "ECCOKV_", "GOMP_", "KMP_"))}
    env["PYTHONPATH"] = str(SRC)
    env.update(extra)
    return env


def _py(code: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _last_json(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------- cache key


def test_kernel_sources_hold_the_kernels_and_what_they_import():
    src = runtime.kernel_sources()
    jit = [n for n, b in src.items() if runtime._JIT_DECORATOR.search(b)]
    assert any(n.startswith("kernels/") for n in jit)
    for name in jit:  # every eccokv module a kernel file imports at top level is hashed
        for f in runtime._eccokv_imports(src[name], runtime.PACKAGE_ROOT):
            assert f.relative_to(runtime.PACKAGE_ROOT).as_posix() in src
    assert "cli.py" not in src and "demo.py" not in src


def test_cache_key_changes_with_any_kernel_source(tmp_path):
    pkg = tmp_path / "eccokv"
    shutil.copytree(runtime.PACKAGE_ROOT, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    key = runtime.cache_key(runtime.kernel_sources(pkg))
    assert key == runtime.cache_key()  # same sources, same key (path-independent)
    seen = {key}
    for name in runtime.kernel_sources(pkg):
        f = pkg / name
        old = f.read_bytes()
        f.write_bytes(old + b"\n# edited\n")
        k = runtime.cache_key(runtime.kernel_sources(pkg))
        assert k not in seen, name
        seen.add(k)
        f.write_bytes(old)
    (pkg / "cli.py").write_bytes((pkg / "cli.py").read_bytes() + b"\n# edited\n")
    assert runtime.cache_key(runtime.kernel_sources(pkg)) == key  # not a kernel source
    # a new kernel file anywhere in the package joins the key
    (pkg / "kernels" / "new_kernel.py").write_text(
        "from numba import njit\n\n\n@njit(cache=True)\ndef f(x):\n    return x\n")
    assert runtime.cache_key(runtime.kernel_sources(pkg)) not in seen


def test_kernels_cache_in_the_keyed_folder_and_other_packages_do_not(tmp_path):
    other = tmp_path / "otherpkg.py"
    other.write_text("from numba import njit\n\n\n@njit(cache=True)\ndef g(x):\n"
                     "    return x + 1\n")
    res = _last_json(_py(f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import eccokv
        from eccokv import runtime
        from eccokv.kernels import ecco_numba
        import otherpkg
        from numba.core.dispatcher import Dispatcher
        d = [v for v in vars(ecco_numba).values() if isinstance(v, Dispatcher)][0]
        print(json.dumps({{"info": runtime.info(), "ours": d.stats.cache_path,
                           "other": otherpkg.g.stats.cache_path}}))
        """, ECCOKV_CACHE=str(tmp_path / "c")))
    keyed = res["info"]["cache_dir"]
    assert keyed == str(tmp_path / "c" / "numba" / runtime.cache_key())
    assert res["ours"].startswith(keyed)
    assert not res["other"].startswith(str(tmp_path / "c"))  # numba's own default


def test_user_numba_cache_dir_wins(tmp_path):
    res = _last_json(_py("""
        import json
        from eccokv import runtime
        from eccokv.kernels import ecco_numba
        from numba.core.dispatcher import Dispatcher
        d = [v for v in vars(ecco_numba).values() if isinstance(v, Dispatcher)][0]
        print(json.dumps({"info": runtime.info(), "ours": d.stats.cache_path}))
        """, ECCOKV_CACHE=str(tmp_path / "c"), NUMBA_CACHE_DIR=str(tmp_path / "user")))
    assert res["info"]["cache_dir"] is None
    assert res["ours"].startswith(str(tmp_path / "user"))


def test_unwritable_cache_falls_back_to_a_temp_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    (tmp_path / "tmp").mkdir()
    res = _last_json(_py("""
        import json
        from eccokv import runtime
        print(json.dumps(runtime.info()))
        """, ECCOKV_CACHE=str(blocker / "sub"), TMPDIR=str(tmp_path / "tmp")))
    assert res["cache_dir"].startswith(str(tmp_path / "tmp"))


# ----------------------------------------------------------------------- threading


def test_default_threading_layer_is_thread_safe():
    res = _last_json(_py("""
        import json
        import numpy as np, numba
        import eccokv
        from eccokv import codecs
        import torch
        c = codecs.get("ecco4")
        c.decode(c.encode(torch.randn(2, 128, 8), axis=1))
        print(json.dumps({"layer": numba.threading_layer()}))
        """))
    assert res["layer"] in ("tbb", "omp")


def test_threading_layer_given_by_the_user_is_kept():
    res = _last_json(_py("""
        import json
        import eccokv, numba
        from eccokv import runtime
        print(json.dumps({"asked": str(numba.config.THREADING_LAYER),
                          "ours": runtime.info()["threading_layer_requested"]}))
        """, NUMBA_THREADING_LAYER="workqueue"))
    assert res["asked"] == "workqueue"


@pytest.mark.slow
def test_two_threads_generate_at_once():
    """Two Python threads each run generate() with EccoCache (fused kernels) at the same
    time, in a plain process: both finish with the single-threaded result."""
    p = _py("""
        import json, threading
        import torch, transformers
        from eccokv import EccoCache
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=32)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
        ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(1))

        def gen():
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=12, do_sample=False,
                                      past_key_values=EccoCache(cfg, "ecco4",
                                                                residual_length=16),
                                      pad_token_id=0)
        ref = gen()
        out = [None, None]

        def work(i):
            for _ in range(3):
                out[i] = gen()
        ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        import numba
        print(json.dumps({"same": [bool(torch.equal(o, ref)) for o in out],
                          "layer": numba.threading_layer()}))
        """)
    res = _last_json(p)
    assert res["same"] == [True, True]
    assert res["layer"] != "workqueue"
