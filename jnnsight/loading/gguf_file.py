"""GGUF files (llama.cpp): a Hugging Face config and dequantized tensors under Hugging Face names.

Named ``gguf_file`` so that it does not shadow the ``gguf`` package.

Example::

    >>> config, tensors = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> config["model_type"], config["num_hidden_layers"], config["tie_word_embeddings"]
    ('llama', 30, True)
    >>> tensors["model.layers.0.self_attn.k_proj.weight"].shape     # PyTorch [out, in]
    (192, 576)

Facts this module relies on (checked against transformers' own GGUF loader,
``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint``, in
tests/test_loading.py):

- ``ReaderTensor.shape`` is in GGML order (fastest axis first, ``[in, out]``);
  ``ReaderTensor.data`` and ``gguf.quants.dequantize(data, type)`` are in numpy
  order, which is PyTorch's ``[out, in]``: the reversed ``shape``.
- llama.cpp's converter permutes the rows of Q and K (weights and biases) of the
  ``llama`` architecture from Hugging Face's rotate-half RoPE layout to GPT-J's
  interleaved one: ``w.reshape(n, 2, d // n // 2, ...).swapaxes(1, 2)``, with
  ``n`` = attention heads for Q and key/value heads for K. The inverse,
  :func:`unpermute_qk`, is ``w.reshape(n, d // n // 2, 2, ...).swapaxes(1, 2)``.
- Tied embeddings: the file has no ``output.weight``; the config then says
  ``tie_word_embeddings=True`` and no ``lm_head.weight`` is returned.
- Not handled (only the ``llama`` architecture is read): Gemma files store
  RMSNorm weights as ``1 + w`` (subtract 1 for Hugging Face's Gemma); Qwen2
  files are not permuted; split GGUF files (``-00001-of-0000N.gguf``); Llama 3.1
  files carry ``rope_freqs.weight`` (llama3 RoPE scaling), which is skipped
  with a warning.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import CheckpointError, CheckpointNotFoundError, _float_dtype, _is_float, iter_progress
from .gguf_format import GGUFFile, GGUFFormatError, read_gguf

#: GGUF ``{arch}.*`` metadata keys and their Hugging Face config names.
_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings",
}

#: Architectures read, with their Hugging Face model type and class.
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM")}

_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SKIPPED = {
    "rope_freqs.weight": (
        "rope_freqs.weight (Llama 3.1-style RoPE frequency scaling) is not used: the "
        "config has no llama3 `rope_scaling`, so logits differ from the original model. "
        "Load the Hugging Face safetensors checkpoint for exact numbers."
    ),
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _reader(path: str | os.PathLike) -> GGUFFile:
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"No such GGUF file: {path}.")
    try:
        reader = read_gguf(path)
    except GGUFFormatError as err:
        raise CheckpointError(
            f"{path} is not a readable GGUF file: {err}. A download that stopped early "
            "leaves such a file: download it again."
        ) from err
    split = reader.fields.get("split.count")
    if split is not None and int(split) > 1:
        raise CheckpointError(
            f"{path.name} is one part of a split GGUF file ({split} parts); jnnsight reads "
            "single-file GGUF only. Merge the parts with llama.cpp's `llama-gguf-split --merge`."
        )
    return reader


def gguf_config(path_or_reader: Any) -> dict[str, Any]:
    """A Hugging Face style config dict from a GGUF file's metadata (no tensors are read).

    Keys: ``model_type``, ``architectures``, ``vocab_size``, ``hidden_size``,
    ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim``, ``rms_norm_eps``, ``rope_theta``
    (and transformers 5's ``rope_parameters``), ``max_position_embeddings``,
    ``tie_word_embeddings``, ``attention_bias``, ``mlp_bias``, ``hidden_act``,
    and the special token ids the file names.
    """
    reader = path_or_reader if isinstance(path_or_reader, GGUFFile) else _reader(path_or_reader)
    fields = reader.fields
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"GGUF architecture {arch!r} is not supported; jnnsight reads {', '.join(map(repr, ARCHITECTURES))}. "
            "Load the model's Hugging Face safetensors checkpoint instead."
        )
    model_type, cls = ARCHITECTURES[arch]
    config: dict[str, Any] = {"model_type": model_type, "architectures": [cls]}
    for key, name in _CONFIG_KEYS.items():
        value = fields.get(f"{arch}.{key}")
        if value is not None:
            config[name] = value
    names = {t.name for t in reader.tensors}
    if "vocab_size" not in config:
        embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
        config["vocab_size"] = int(embed.shape[-1])  # GGML order: [hidden, vocab]
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("rms_norm_eps", 1e-5)
    config.setdefault("rope_theta", 10000.0)
    head_dim = fields.get(f"{arch}.attention.key_length", fields.get(f"{arch}.rope.dimension_count"))
    config["head_dim"] = int(head_dim) if head_dim is not None else config["hidden_size"] // config["num_attention_heads"]
    config["tie_word_embeddings"] = "output.weight" not in names
    config["attention_bias"] = "blk.0.attn_q.bias" in names
    config["mlp_bias"] = "blk.0.ffn_up.bias" in names
    config["hidden_act"] = "silu"
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    scaling = fields.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        rope_scaling = {"rope_type": scaling, "factor": float(fields.get(f"{arch}.rope.scaling.factor", 1.0))}
        original = fields.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            rope_scaling["original_max_position_embeddings"] = int(original)
        config["rope_scaling"] = rope_scaling
        config["rope_parameters"] = {**rope_scaling, "rope_theta": config["rope_theta"]}
    for token in ("bos", "eos", "padding", "unknown"):
        value = fields.get(f"tokenizer.ggml.{token}_token_id")
        if value is not None:
            config[{"padding": "pad_token_id", "unknown": "unk_token_id"}.get(token, f"{token}_token_id")] = int(value)
    return config


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation of Q or K rows (Hugging Face layout to GGUF layout)."""
    d = w.shape[0]
    return w.reshape(n_heads, 2, d // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`permute_qk` (GGUF layout back to Hugging Face layout)."""
    d = w.shape[0]
    return w.reshape(n_heads, d // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face key of a llama GGUF tensor name (``None`` for names to skip)."""
    if gguf_name in _SKIPPED:
        return None
    match = _BLOCK.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    else:
        stem, _, kind = gguf_name.rpartition(".")
        if stem in _TOP_NAMES and kind in ("weight", "bias"):
            return f"{_TOP_NAMES[stem]}.{kind}"
    raise CheckpointError(
        f"GGUF tensor {gguf_name!r} has no counterpart in a Hugging Face Llama model "
        "(a mixture-of-experts or another architecture stored as 'llama'?). Load the "
        "model's Hugging Face safetensors checkpoint instead."
    )


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    return {
        "model.embed_tokens.weight": (v, h),
        "lm_head.weight": (v, h),
        "model.norm.weight": (h,),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }


def _dequantize(tensor: Any) -> np.ndarray:
    import gguf
    from gguf import GGMLQuantizationType as Q

    if tensor.tensor_type in (Q.I8, Q.I16, Q.I32, Q.I64, Q.F64):
        array = np.asarray(tensor.data)
    else:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # ``shape`` is GGML order (fastest axis first); numpy / PyTorch order is its reverse.
    return array.reshape(tuple(int(n) for n in reversed(tensor.shape)))


def load_gguf(
    path: str | os.PathLike,
    dtype: Any = np.float32,
    *,
    progress: bool | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config, tensors)`` of a GGUF file: a Hugging Face config dict, and
    dequantized tensors under Hugging Face names in PyTorch ``[out, in]`` layout.

    Quantized tensors are dequantized with ``gguf.quants.dequantize`` (float32)
    and cast to ``dtype`` (float32 unless told; ``None`` keeps float32). Q and K
    are un-permuted (:func:`unpermute_qk`). ``lm_head.weight`` is present only
    when the file has ``output.weight`` (otherwise ``tie_word_embeddings``).
    """
    reader = _reader(path)
    config = gguf_config(reader)
    target = _float_dtype(dtype)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    shapes = _expected_shapes(config)
    total = sum(int(t.n_elements) for t in reader.tensors) * 4
    tensors: dict[str, np.ndarray] = {}
    for tensor in iter_progress(list(reader.tensors), total, "Dequantizing GGUF", progress):
        name = hf_name(tensor.name)
        if name is None:
            warnings.warn(f"{Path(path).name}: {_SKIPPED[tensor.name]}", stacklevel=2)
            continue
        array = _dequantize(tensor)
        part = tensor.name.split(".")[-2]
        if part in heads:
            array = unpermute_qk(array, heads[part])
        expected = shapes.get(name) or shapes.get(name.split(".", 3)[-1])
        if expected is not None and array.shape != expected:
            raise CheckpointError(
                f"GGUF tensor {tensor.name!r} has shape {array.shape} (PyTorch order) but the "
                f"config implies {expected} for {name!r}: the file's metadata and tensors disagree."
            )
        cast = target if target is not None and _is_float(array.dtype) else array.dtype
        tensors[name] = array.astype(cast)  # always a copy: owns its memory, not the file's mmap
    return config, tensors
