"""eccokv.warmup: after a warm-up, a fresh process running generate(), the codecs and the
fused attention compiles nothing (numba's dispatcher statistics say so)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import eccokv
from eccokv import warmup

SRC = Path(eccokv.__file__).resolve().parent.parent

USE = """
import json, torch, transformers
from eccokv import EccoCache, codecs, warmup
from eccokv.kernels.attention import fused_attention
before = warmup.compile_counts()
cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=192, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=6,
                               num_key_value_heads=2, head_dim=32)
torch.manual_seed(0)
model = transformers.Qwen2ForCausalLM(cfg).eval()
ids = torch.randint(3, 128, (1, 300))
for name in ("ecco4", "kivi4"):
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                       past_key_values=EccoCache(cfg, name, residual_length=32))
c = codecs.get("ecco3")
k = torch.randn(3, 1000, 64, dtype=torch.bfloat16)
chunk = c.encode(k, axis=1)
c.decode(chunk, out=torch.empty(3, 1000, 64, dtype=torch.float16))
fused_attention(torch.randn(9, 2, 64), [chunk], k[:, :5], [chunk], k[:, :5], scaling=0.1)
print(json.dumps({"compiled": warmup.compiled_since(before),
                  "hits": sum(v["hits"] for v in warmup.compile_counts().values())}))
"""


def _run(code: str, cache: Path, extra: dict | None = None, log: list | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "ECCOKV_"))}
    env.update(PYTHONPATH=str(SRC), ECCOKV_CACHE=str(cache), **(extra or {}))
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    if log is not None:
        log.extend(p.stdout.splitlines())
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_compile_counts_see_the_kernels():
    from eccokv import codecs

    c = codecs.get("ecco4")
    import torch

    c.decode(c.encode(torch.randn(2, 128, 8), axis=1))
    counts = warmup.compile_counts()
    assert counts and all({"hits", "misses", "overloads"} <= set(v) for v in counts.values())
    assert any(v["overloads"] for v in counts.values())
    assert warmup.compiled_since(counts) == {}


def test_unknown_part_is_an_error():
    with pytest.raises(ValueError, match="unknown warm-up parts"):
        warmup.run(("codecs", "nope"), say=lambda m: None)


def test_fused_streams_cover_every_fused_codec():
    streams = warmup.fused_streams()
    assert ("ecco4", 1) in streams and ("kivi2", 2) in streams and ("int4", 1) in streams


@pytest.mark.slow
def test_after_warmup_a_fresh_process_compiles_nothing(tmp_path):
    """Fresh numba cache: warm-up compiles (and writes its marker), then a new process
    using generate(), a codec and fused attention loads every kernel from the cache."""
    cache = tmp_path / "cache"
    res = _run("""
        import json
        from eccokv import warmup
        r = warmup.run(say=lambda m: None)
        print(json.dumps({"compiled": r["compiled"], "done": warmup.done(),
                          "dir": r["runtime"]["cache_dir"]}))
        """, cache)
    assert res["compiled"] and res["done"]
    assert res["dir"].startswith(str(cache))
    log: list[str] = []
    use = _run(USE, cache, {"NUMBA_DEBUG_CACHE": "1"}, log)
    assert use["compiled"] == {}, use
    assert use["hits"] > 0
    # numba's own cache log agrees: entries loaded, none saved (a save follows a compile)
    assert any("data loaded" in line for line in log)
    assert not [line for line in log if "data saved" in line or "index saved" in line]
