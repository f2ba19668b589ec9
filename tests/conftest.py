"""Shared fixtures: one small toy transformer, and a hand-written reference.

The reference runs the same flax module under a plain ``nn.intercept_methods``
interceptor that applies edits written by hand, so every jnnsight result is
checked against a forward computed another way.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jnnsight.toy import toy_model

Edit = Callable[[tuple[str, ...], int, Any], Any]


def reference(
    model, *args: Any, edit: Edit | None = None, variables: Any = None, **kwargs: Any
) -> tuple[Any, dict]:
    """Run ``model.module`` with a hand-written interceptor.

    ``edit(path, call, output)`` returns the output to use instead (or the same).
    Returns the model output and every module's output by ``(path, call)``,
    recorded after the edit.
    """
    seen: dict[tuple[tuple[str, ...], int], Any] = {}
    counts: dict[tuple[str, ...], int] = {}

    def interceptor(next_fun, a, k, context):
        if context.method_name != "__call__":
            return next_fun(*a, **k)
        path = tuple(context.module.path)
        call = counts.get(path, 0)
        counts[path] = call + 1
        out = next_fun(*a, **k)
        if edit is not None:
            out = edit(path, call, out)
        seen[(path, call)] = out
        return out

    with nn.intercept_methods(interceptor):
        out = model.module.apply(variables or model.variables, *args, **kwargs)
    return out, seen


@pytest.fixture
def compile_counter():
    """Counts XLA backend compilations while the test runs."""
    events: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="session")
def toy():
    """A 3-block toy transformer (width 16, vocab 32) and a batch of 2 x 6 tokens."""
    model, tokens = toy_model(layers=3, width=16, heads=2, vocab=32, length=6, batch=2, seed=1)
    return model, tokens


def run_script(script: Path, *args: str, timeout: int = 900) -> str:
    """Run a Python file in a fresh process, as a user would; its stdout (stderr on failure)."""
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_close(a: Any, b: Any, tol: float = 1e-5) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert jnp.shape(x) == jnp.shape(y)
        assert float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y)), initial=0.0)) <= tol


TINY_LLAMA = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                  rope_theta=5000.0)
TINY_GPT2 = dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
# name: (transformers family, config)
TINY_LANGUAGE_MODELS = {
    "gpt2": ("GPT2", TINY_GPT2),
    "llama": ("Llama", TINY_LLAMA),
    "mistral_window": ("Mistral", dict(TINY_LLAMA, sliding_window=4)),
    "qwen3": ("Qwen3", dict(TINY_LLAMA, attention_bias=True)),
}


def tiny_language_model(name: str, folder) -> tuple[Any, Any]:
    """transformers' PyTorch model with N(0, 0.5) weights, and jnnsight's loaded from its folder.

    ``name`` is a key of ``TINY_LANGUAGE_MODELS``; the torch model generates without
    an end-of-sequence token (as ``lm.generate(..., eos_token_id=None)``).
    """
    import warnings

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jnnsight import LanguageModel

    family, config = TINY_LANGUAGE_MODELS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = getattr(transformers, f"{family}Config")(**config, attn_implementation="eager")
        head = "GPT2LMHeadModel" if family == "GPT2" else f"{family}ForCausalLM"
        tm = getattr(transformers, head)(hf_config).eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_(0.0, 0.5)
    tm.generation_config.eos_token_id = None
    tm.generation_config.pad_token_id = 0
    tm.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer files in the folder
        lm = LanguageModel(folder)
    return tm, lm
