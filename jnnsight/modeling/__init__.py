"""Model families as flax.linen modules with Hugging Face PyTorch names.

One file per family, readable top to bottom: ``gpt2.py`` and ``llama.py``
(Llama 2/3, Mistral, Qwen2, Qwen3). :func:`build` picks the family from a
config.json's ``model_type``.

Example::

    >>> module, config = build({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, ...})
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from ..errors import JnnsightError

# model_type -> (module file, config class, model class)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "gpt2": ("gpt2", "GPT2Config", "GPT2LMHeadModel"),
    "llama": ("llama", "LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("llama", "LlamaConfig", "LlamaForCausalLM"),
    "ministral": ("llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("llama", "LlamaConfig", "LlamaForCausalLM"),
}

# The input embedding's checkpoint key per family file: a tied lm_head.weight is this array.
EMBEDDINGS: dict[str, str] = {"gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight"}
# transformers' default where config.json has no tie_word_embeddings
TIED_BY_DEFAULT: dict[str, bool] = {"gpt2": True, "llama": False}


def family(model_type: str) -> tuple[Any, type[nn.Module], Callable[..., Any]]:
    """The config class, model class and ``init_variables`` of a ``model_type``."""
    entry = FAMILIES.get(model_type)
    if entry is None:
        raise JnnsightError(
            f"no jnnsight model family for model_type {model_type!r}; supported: "
            f"{', '.join(sorted(FAMILIES))}. For another linen model, wrap it with NNsight."
        )
    module = importlib.import_module(f"{__name__}.{entry[0]}")
    return getattr(module, entry[1]), getattr(module, entry[2]), module.init_variables


def param_axes_of(module: nn.Module) -> Callable[[tuple[str, ...]], tuple[str | None, ...]]:
    """The family's ``param_axes`` for one of our model modules (no axes for others)."""
    source = importlib.import_module(type(module).__module__)
    return getattr(source, "param_axes", lambda path: ())


def build(config: dict[str, Any], dtype: Any = jnp.float32) -> tuple[nn.Module, Any]:
    """The linen module of a Hugging Face ``config.json`` dict, and its parsed config."""
    config_class, model_class, _ = family(config.get("model_type", ""))
    parsed = config_class.from_hf(config)
    return model_class(parsed, dtype=dtype), parsed


def tie_embeddings(tensors: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` with ``lm_head.weight`` set to the embedding where the checkpoint ties
    them, or the embedding set to the head where only the head was stored (safetensors'
    ``save_model`` keeps one name of a shared tensor), as transformers loads both.

    The same array object stands at both keys: no copy in memory.
    """
    family = FAMILIES[config.get("model_type", "")][0]
    embedding = EMBEDDINGS[family]
    if not config.get("tie_word_embeddings", TIED_BY_DEFAULT[family]):
        return tensors
    if "lm_head.weight" not in tensors and embedding in tensors:
        return {**tensors, "lm_head.weight": tensors[embedding]}
    if "lm_head.weight" in tensors and embedding not in tensors:
        return {**tensors, embedding: tensors["lm_head.weight"]}
    return tensors
