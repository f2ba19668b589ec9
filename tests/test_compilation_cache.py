"""A new process finds the programs an earlier one compiled in jnnsight's cache folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, jax
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None)
    from jnnsight.toy import toy_model
    model, tokens = toy_model(layers=2, width=16, heads=2, vocab=32, length=5)
    with model.trace(tokens):
        model.h[1].output[0] = model.h[1].output[0] * 2
        logits = model.output.save()
    print(json.dumps({"hits": len(hits), "folder": jax.config.jax_compilation_cache_dir}))
""")


def _run(env: dict, folder) -> dict:
    script = folder / "trace_once.py"  # a file: a block needs readable source
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_compiled_programs_from_the_cache(tmp_path):
    env = {**os.environ, "JNNSIGHT_CACHE_DIR": str(tmp_path / "xla"), "JAX_PLATFORMS": "cpu"}
    env.pop("JNNSIGHT_COMPILATION_CACHE", None)
    first = _run(env, tmp_path)
    assert first["folder"] == str(tmp_path / "xla")
    assert first["hits"] == 0 and any((tmp_path / "xla").iterdir())
    second = _run(env, tmp_path)
    assert second["hits"] >= 1


def test_the_cache_can_be_turned_off(tmp_path):
    env = {**os.environ, "JNNSIGHT_CACHE_DIR": str(tmp_path / "xla"),
           "JNNSIGHT_COMPILATION_CACHE": "0", "JAX_PLATFORMS": "cpu"}
    assert _run(env, tmp_path)["folder"] in (None, "")
    assert not (tmp_path / "xla").exists()
