"""The Llama family in flax.linen: Llama 1/2/3, Mistral, Qwen2 and Qwen3.

One file, read top to bottom like transformers' ``modeling_llama.py``: the
config, RoPE, attention, MLP, the decoder layer, the model and the causal LM
head. Module and parameter names are the Hugging Face PyTorch ones, so a
parameter's linen path is its checkpoint key with ``layers.0`` written
``layers_0`` (:func:`jnnsight.modeling.common.path_of`), and a checkpoint loads
with :func:`jnnsight.modeling.common.nest` and nothing else::

    LlamaForCausalLM
      model                      LlamaModel
        embed_tokens             Embedding        weight [vocab, hidden]
        rotary_emb               LlamaRotaryEmbedding (no parameters)
        layers_0 .. layers_{n-1} LlamaDecoderLayer -> (hidden,)
          input_layernorm        RMSNorm
          self_attn              LlamaAttention   -> (output, attention probabilities)
            q_proj k_proj v_proj o_proj           Linear, weight [out, in]
            q_norm k_norm        RMSNorm over head_dim (Qwen3 only)
          post_attention_layernorm               RMSNorm
          mlp                    LlamaMLP
            gate_proj up_proj down_proj          Linear
        norm                     RMSNorm
      lm_head                    Linear, no bias, weight [vocab, hidden]

The numbers follow transformers' PyTorch implementation (eager attention):
RMSNorm in float32, RoPE with the ``rotate_half`` convention and ``inv_freq``
in float32 (default, ``linear`` and ``llama3`` scaling), masked scores set to
the dtype's minimum, softmax in float32, grouped-query attention by repeating
each key/value head over consecutive query heads.

Family differences, all read from ``config.json`` by :meth:`LlamaConfig.from_hf`:

- Llama: ``attention_bias`` (q, k, v and o) and ``mlp_bias``.
- Mistral: no biases; ``sliding_window`` on every layer when it is not null, or on the
  ``sliding_attention`` layers of ``layer_types`` where the config lists them (as
  transformers reads it: Ministral).
- Qwen2: q, k, v biases always, no o bias; a sliding window only where
  ``use_sliding_window`` is true and only on the ``sliding_attention`` layers.
- Qwen3: ``attention_bias`` (q, k, v and o), RMSNorm over ``head_dim`` on q and k
  before RoPE (``q_norm``, ``k_norm``), windows as Qwen2.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from jnnsight.modeling.llama import LlamaConfig, LlamaForCausalLM, init_variables
    >>> config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> variables = init_variables(config, jax.random.key(0))
    >>> ids = jnp.array([[1, 2, 3]])
    >>> LlamaForCausalLM(config).apply(variables, ids).logits.shape
    (1, 3, 101)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .common import (Activation, CausalLMOutput, Embedding, Linear, RMSNorm, cache_mask, causal_mask,
                     contract, nan_where_outside, write_cache)

# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------

FAMILIES = ("llama", "mistral", "ministral", "qwen2", "qwen3")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

# config.json fields read by from_hf.
_USED_FIELDS = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers",
    "layer_types", "hidden_act", "original_max_position_embeddings",
})

# config.json fields that do not change the forward's numbers.
HARMLESS_FIELDS = frozenset({
    # identity and bookkeeping
    "architectures", "is_llama_config", "transformers_version", "_name_or_path", "name_or_path", "auto_map",
    "torch_dtype", "dtype", "use_bfloat16", "tokenizer_class", "_commit_hash",
    "_attn_implementation_autoset", "attn_implementation", "model_name", "library_name",
    # special tokens
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "unk_token_id",
    "decoder_start_token_id",
    # training, caching and output switches
    "use_cache", "initializer_range", "attention_dropout", "hidden_dropout", "dropout",
    "pretraining_tp", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "gradient_checkpointing", "use_return_dict", "is_decoder", "is_encoder_decoder",
    "add_cross_attention", "tie_encoder_decoder", "chunk_size_feed_forward", "pruned_heads",
    "cross_attention_hidden_size", "problem_type", "finetuning_task", "id2label", "label2id",
    "num_labels", "task_specific_params", "prefix", "tf_legacy_loss", "use_mrope",
    # read by other runtimes only (SmolLM2's config.json carries both)
    "rope_interleaved", "transformers.js_config",
    # generation defaults
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "max_new_tokens",
})

_ROPE_FIELDS = frozenset({
    "rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings", "partial_rotary_factor",
})


@dataclass(frozen=True)
class LlamaConfig:
    """What a Llama-family forward needs, read from a Hugging Face ``config.json``.

    Frozen and hashable (it is a linen module attribute). Build it with
    :meth:`from_hf`; the defaults are Llama's.

    Example::

        >>> import json
        >>> config = LlamaConfig.from_hf(json.load(open("Qwen2.5-0.5B/config.json")))
        >>> config.model_type, config.attention_bias, config.attention_out_bias
        ('qwen2', True, False)
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None   # None: as many as query heads (no GQA)
    head_dim: int | None = None              # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # RoPE: rope_type is "default", "linear" or "llama3"
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int | None = None
    # biases: attention_bias on q, k, v; attention_out_bias on o
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    # Qwen3: RMSNorm over head_dim on q and k before RoPE
    qk_norm: bool = False
    # sliding windows: `sliding_window` applies to every layer when layer_types is None,
    # else to the layers whose type is "sliding_attention"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.rope_type not in ("default", "linear", "llama3"):
            nearest = (
                " 'dynamic' equals 'default' for sequences within the original context "
                "length: to run only those, copy the checkpoint folder and set "
                "\"rope_scaling\": null in its config.json."
                if self.rope_type == "dynamic" else
                " It changes the rotation at every length, so no supported type gives the "
                "same logits: run this model with transformers (in PyTorch, with nnsight)."
            )
            raise NotImplementedError(
                f"RoPE type {self.rope_type!r} is not implemented; jnnsight's Llama supports "
                "'default', 'linear' and 'llama3'." + nearest
            )
        if self.hidden_act not in ACTIVATIONS:
            raise NotImplementedError(
                f"hidden_act {self.hidden_act!r} is not implemented; known: {sorted(ACTIVATIONS)}."
            )
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer ``layer``, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "LlamaConfig":
        """A config from a ``config.json`` dict of model_type llama, mistral, qwen2 or qwen3.

        Reads the transformers-5 ``rope_parameters`` and the older ``rope_theta`` plus
        ``rope_scaling``; warns (does not fail) on fields that might change the
        numbers and that this implementation does not read.

        Example::

            >>> LlamaConfig.from_hf({"model_type": "mistral", "hidden_size": 64,
            ...     "num_attention_heads": 4, "sliding_window": 4}).window_of(0)
            4
        """
        model_type = config.get("model_type", "llama")
        if model_type not in FAMILIES:
            raise ValueError(
                f"model_type {model_type!r} is not in the Llama family ({', '.join(FAMILIES)})."
            )
        unknown = sorted(set(config) - _USED_FIELDS - HARMLESS_FIELDS)
        if unknown:
            warnings.warn(
                f"config.json fields not read by jnnsight's Llama ({model_type}), which might "
                f"change the numbers: {unknown}",
                stacklevel=2,
            )

        def get(name: str, default: Any) -> Any:
            value = config.get(name)
            return default if value is None else value

        heads = int(config.get("num_attention_heads", 32))
        hidden = int(config.get("hidden_size", 4096))
        layers = int(config.get("num_hidden_layers", 32))
        max_positions = int(get("max_position_embeddings", 2048))

        # RoPE: transformers 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
        # Where a file has both (an old guide's `rope_scaling` added to a new file),
        # transformers 5 takes `rope_scaling`, and so does this.
        rope = dict(get("rope_scaling", {}) or get("rope_parameters", {}))
        if any(isinstance(v, dict) for v in rope.values()):
            raise NotImplementedError("per-layer-type `rope_parameters` are not implemented.")
        strange = sorted(set(rope) - _ROPE_FIELDS)
        if strange:
            warnings.warn(f"RoPE fields not read by jnnsight's Llama: {strange}", stacklevel=2)
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            warnings.warn("partial_rotary_factor != 1 is not used by the Llama family; ignored.",
                          stacklevel=2)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_theta = float(rope.get("rope_theta", get("rope_theta", 10000.0)))
        # as transformers' standardize_rope_params: a top-level value wins
        original = config.get("original_max_position_embeddings") or rope.get(
            "original_max_position_embeddings", max_positions)

        # Biases, q/k norms and sliding windows differ by family, as in transformers.
        attention_bias = bool(get("attention_bias", False))
        attention_out_bias = attention_bias
        mlp_bias = bool(get("mlp_bias", False))
        qk_norm = False
        sliding_window: int | None = None
        layer_types: tuple[str, ...] | None = None
        if model_type == "llama":
            pass  # transformers' Llama has no sliding window
        elif model_type in ("mistral", "ministral"):
            if attention_bias or mlp_bias:
                warnings.warn("transformers' Mistral has no biases; attention_bias/mlp_bias ignored.",
                              stacklevel=2)
            attention_bias = attention_out_bias = mlp_bias = False
            sliding_window = config.get("sliding_window", 4096)  # MistralConfig's default
            # transformers reads a mistral config with layer_types as Ministral's: the
            # window applies to the "sliding_attention" layers only
            if config.get("layer_types") is not None:
                layer_types = tuple(config["layer_types"])
        else:  # qwen2, qwen3
            if model_type == "qwen2":
                attention_bias, attention_out_bias = True, False
            else:
                qk_norm = True
            if mlp_bias:
                warnings.warn(f"transformers' {model_type} has no MLP biases; mlp_bias ignored.",
                              stacklevel=2)
            mlp_bias = False
            if config.get("use_sliding_window", False):
                sliding_window = config.get("sliding_window", 4096)
            if config.get("layer_types") is not None:
                layer_types = tuple(config["layer_types"])
            else:
                first = int(get("max_window_layers", 28))
                layer_types = tuple(
                    "sliding_attention" if sliding_window is not None and i >= first
                    else "full_attention"
                    for i in range(layers)
                )

        if layer_types is not None and len(layer_types) != layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries for {layers} layers.")
        return cls(
            model_type=model_type,
            vocab_size=int(config.get("vocab_size", 32000)),
            hidden_size=hidden,
            intermediate_size=int(config.get("intermediate_size", 11008)),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads", heads)),
            head_dim=int(get("head_dim", hidden // heads)),
            hidden_act=get("hidden_act", "silu"),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=int(original),
            attention_bias=attention_bias,
            attention_out_bias=attention_out_bias,
            mlp_bias=mlp_bias,
            qk_norm=qk_norm,
            sliding_window=None if sliding_window is None else int(sliding_window),
            layer_types=layer_types,
        )


# ----------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """RoPE's inverse frequencies ``[head_dim // 2]`` in float32, as transformers computes them.

    Example::

        >>> rope_inv_freq(LlamaConfig(hidden_size=64, num_attention_heads=4))[:2]
        array([1.        , 0.31622776], dtype=float32)
    """
    f32 = np.float32
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)
    inv_freq = (f32(1.0) / (f32(config.rope_theta) ** exponent)).astype(f32)
    if config.rope_type == "linear":
        inv_freq = (inv_freq / f32(config.rope_factor)).astype(f32)
    elif config.rope_type == "llama3":
        factor = f32(config.rope_factor)
        low, high = f32(config.rope_low_freq_factor), f32(config.rope_high_freq_factor)
        old_context = f32(config.rope_original_max_position_embeddings
                          or config.max_position_embeddings)
        low_freq_wavelen = old_context / low
        high_freq_wavelen = old_context / high
        wavelen = (f32(2 * math.pi) / inv_freq).astype(f32)
        # long wavelengths are divided by `factor`, short ones kept, the middle interpolated
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(f32)
        smooth = ((old_context / wavelen - low) / (high - low)).astype(f32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(f32)
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(f32)
    return inv_freq


# model_type -> transformers' class-name prefix (LlamaDecoderLayer is Qwen3DecoderLayer there)
CLASS_PREFIXES = {"llama": "Llama", "mistral": "Mistral", "ministral": "Ministral",
                  "qwen2": "Qwen2", "qwen3": "Qwen3"}


class HFClassName:
    """A Llama-family module printed under transformers' class name for its config's
    family: ``print(lm)`` on a Qwen3 checkpoint shows ``Qwen3DecoderLayer``.

    Example::

        >>> LlamaMLP(LlamaConfig(model_type="qwen3")).hf_class_name
        'Qwen3MLP'
    """

    @property
    def hf_class_name(self) -> str:
        prefix = CLASS_PREFIXES.get(self.config.model_type, "Llama")
        return prefix + type(self).__name__.removeprefix("Llama")


class LlamaRotaryEmbedding(HFClassName, nn.Module):
    """``(cos, sin)``, each ``[batch, length, head_dim]``, for the given position ids.

    Example::

        >>> cos, sin = LlamaRotaryEmbedding(config).apply({}, x, jnp.arange(5)[None])
    """

    config: LlamaConfig

    def __call__(self, x: jax.Array, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        inv_freq = jnp.asarray(rope_inv_freq(self.config))
        freqs = position_ids[..., None].astype(jnp.float32) * inv_freq
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        # the attention scaling of default, linear and llama3 RoPE is 1
        return jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """``[-x2, x1]`` for the halves ``x1, x2`` of the last axis (transformers' convention)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary_pos_emb(
    q: jax.Array, k: jax.Array, cos: jax.Array, sin: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Rotate ``q`` and ``k`` ``[batch, length, heads, head_dim]`` by ``cos``/``sin`` ``[batch, length, head_dim]``."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ----------------------------------------------------------------------------------------
# Attention, MLP, decoder layer
# ----------------------------------------------------------------------------------------


class LlamaAttention(HFClassName, nn.Module):
    """Grouped-query self-attention; returns ``(output, probabilities [batch, heads, q, k])``.

    Given a ``past_key_value`` cache (generation), the new keys and values are
    written at ``cache_position``, the queries attend over every cache slot,
    and the updated cache comes third: ``(output, probabilities, (keys, values))``.

    Example::

        >>> out, probs = model.model.layers[0].self_attn.output   # inside a trace block
    """

    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.q_proj = Linear(c.num_attention_heads * c.head_dim, c.attention_bias, self.dtype)
        self.k_proj = Linear(c.num_key_value_heads * c.head_dim, c.attention_bias, self.dtype)
        self.v_proj = Linear(c.num_key_value_heads * c.head_dim, c.attention_bias, self.dtype)
        self.o_proj = Linear(c.hidden_size, c.attention_out_bias, self.dtype)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.rms_norm_eps, self.dtype)
            self.k_norm = RMSNorm(c.rms_norm_eps, self.dtype)

    def __call__(
        self,
        hidden_states: jax.Array,
        position_embeddings: tuple[jax.Array, jax.Array],
        attention_mask: jax.Array,
        past_key_value: tuple[jax.Array, jax.Array] | None = None,
        cache_position: jax.Array | None = None,
    ) -> tuple[jax.Array, ...]:
        c = self.config
        b, t, _ = hidden_states.shape
        heads, kv_heads, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = self.q_proj(hidden_states).reshape(b, t, heads, d)
        k = self.k_proj(hidden_states).reshape(b, t, kv_heads, d)
        v = self.v_proj(hidden_states).reshape(b, t, kv_heads, d)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        present = None
        if past_key_value is not None:
            k, v = present = write_cache(past_key_value, k, v, cache_position)
        s = k.shape[1]

        # query head g * groups + r reads key/value head g (transformers' repeat_kv)
        groups = heads // kv_heads
        q = q.reshape(b, t, kv_heads, groups, d)
        scores = contract("bqgrd,bkgd->bgrqk", q, k).reshape(b, heads, t, s) * d**-0.5
        scores = jnp.where(attention_mask, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        out = contract("bgrqk,bkgd->bqgrd", probs.reshape(b, kv_heads, groups, t, s), v)
        out = self.o_proj(out.reshape(b, t, heads * d))
        return (out, probs) if present is None else (out, probs, present)


class LlamaMLP(HFClassName, nn.Module):
    """``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""

    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.gate_proj = Linear(c.intermediate_size, c.mlp_bias, self.dtype)
        self.up_proj = Linear(c.intermediate_size, c.mlp_bias, self.dtype)
        self.down_proj = Linear(c.hidden_size, c.mlp_bias, self.dtype)
        self.act_fn = Activation(ACTIVATIONS[c.hidden_act])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(HFClassName, nn.Module):
    """Pre-norm attention and MLP with residuals; returns a tuple ``(hidden,)``.

    Element 0 is the hidden state, as in transformers 4.x and the nnsight README.
    With a ``past_key_value`` cache (generation) it returns ``(hidden, (keys, values))``,
    the updated cache second, as transformers 4.x did with ``use_cache``.

    Example::

        >>> with model.trace(ids):
        ...     h = model.model.layers[1].output[0].save()
    """

    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.input_layernorm = RMSNorm(c.rms_norm_eps, self.dtype)
        self.self_attn = LlamaAttention(c, self.dtype)
        self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, self.dtype)
        self.mlp = LlamaMLP(c, self.dtype)

    def __call__(
        self,
        hidden_states: jax.Array,
        position_embeddings: tuple[jax.Array, jax.Array],
        attention_mask: jax.Array,
        past_key_value: tuple[jax.Array, jax.Array] | None = None,
        cache_position: jax.Array | None = None,
    ) -> tuple[Any, ...]:
        residual = hidden_states
        attn = self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                              attention_mask, past_key_value, cache_position)
        hidden_states = residual + attn[0]
        residual = hidden_states
        hidden_states = residual + self.mlp(self.post_attention_layernorm(hidden_states))
        return (hidden_states,) if past_key_value is None else (hidden_states, attn[2])


# ----------------------------------------------------------------------------------------
# Model and causal LM
# ----------------------------------------------------------------------------------------


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids ``clip(cumsum(mask) - 1, 0)``: a left-padded row counts from its first token."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class LlamaModel(HFClassName, nn.Module):
    """Embeddings, decoder layers and the final norm; returns ``(last_hidden_state,)``.

    With ``past_key_values`` (one ``(keys, values)`` pair per layer, each
    ``[batch, slots, kv_heads, head_dim]``), the input's tokens are written at
    slot ``cache_position``, ``attention_mask`` covers all ``slots``, and
    ``position_ids`` must be given; it returns ``(last_hidden_state, past_key_values)``.

    Example::

        >>> (hidden,) = LlamaModel(config).apply({"params": params["model"]}, ids)
    """

    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, self.dtype)
        self.rotary_emb = LlamaRotaryEmbedding(c)
        self.layers = [LlamaDecoderLayer(c, self.dtype) for _ in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        past_key_values: tuple[tuple[jax.Array, jax.Array], ...] | None = None,
        cache_position: jax.Array | None = None,
    ) -> tuple[Any, ...]:
        b, t = input_ids.shape
        if past_key_values is not None and (position_ids is None or attention_mask is None):
            raise ValueError("with past_key_values, pass attention_mask (over all cache slots) "
                             "and position_ids.")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)
            else:
                position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)

        hidden_states = nan_where_outside(self.embed_tokens(input_ids).astype(self.dtype),
                                          input_ids, self.config.vocab_size, attention_mask)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        masks: dict[int | None, jax.Array] = {}
        presents = []
        for i, layer in enumerate(self.layers):
            window = self.config.window_of(i)
            if window not in masks:
                masks[window] = (causal_mask(attention_mask, window) if past_key_values is None
                                 else cache_mask(attention_mask, cache_position, t, window))
            past = None if past_key_values is None else past_key_values[i]
            out = layer(hidden_states, position_embeddings, masks[window], past, cache_position)
            hidden_states = out[0]
            if past is not None:
                presents.append(out[1])
        hidden_states = self.norm(hidden_states)
        return (hidden_states,) if past_key_values is None else (hidden_states, tuple(presents))


class LlamaForCausalLM(HFClassName, nn.Module):
    """Token ids ``[batch, length]`` to ``CausalLMOutput(logits=[batch, length, vocab])``.

    ``attention_mask`` ``[batch, length]`` is 1 on real tokens; left padding is
    supported: without ``position_ids`` they are counted from the mask, so a
    left-padded row gives the numbers of the prompt alone. ``dtype`` is the
    parameters' and activations' dtype (float32 or bfloat16).

    Example::

        >>> import json, safetensors.numpy
        >>> from jnnsight import NNsight
        >>> from jnnsight.modeling.common import nest
        >>> config = LlamaConfig.from_hf(json.load(open("model/config.json")))
        >>> flat = safetensors.numpy.load_file("model/model.safetensors")
        >>> flat.setdefault("lm_head.weight", flat["model.embed_tokens.weight"])  # tied
        >>> model = NNsight(LlamaForCausalLM(config), {"params": nest(flat)})
        >>> with model.trace(ids):
        ...     h = model.model.layers[-1].output[0].save()
        ...     logits = model.lm_head.output.save()
    """

    # Its modules and calls do not depend on input sizes: jnnsight may discover its
    # sites once on symbolic sizes (jnnsight.nnsight.SYMBOLIC_SIZES).
    jnnsight_symbolic_sizes: ClassVar[bool] = True

    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.model = LlamaModel(self.config, self.dtype)
        self.lm_head = Linear(self.config.vocab_size, False, self.dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        past_key_values: tuple[tuple[jax.Array, jax.Array], ...] | None = None,
        cache_position: jax.Array | None = None,
    ) -> CausalLMOutput:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, cache_position)
        presents = out[1] if past_key_values is not None else None
        return CausalLMOutput(logits=self.lm_head(out[0]), past_key_values=presents)

    def cache_shapes(self, batch: int, slots: int) -> tuple[tuple[jax.ShapeDtypeStruct, ...], ...]:
        """The ``past_key_values`` of a generation: ``(keys, values)`` per layer."""
        c = self.config
        one = jax.ShapeDtypeStruct((batch, slots, c.num_key_value_heads, c.head_dim), self.dtype)
        return tuple((one, one) for _ in range(c.num_hidden_layers))


# Logical axes of each parameter, by (module, parameter) name; the rest (norms) replicate.
# Activations: hidden states are ("batch", "length", "embed"), logits ("batch", "length", "vocab").
PARAM_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("embed_tokens", "weight"): ("vocab", "embed"),
    ("lm_head", "weight"): ("vocab", "embed"),
    ("q_proj", "weight"): ("heads", "embed"),
    ("q_proj", "bias"): ("heads",),
    ("k_proj", "weight"): ("kv_heads", "embed"),
    ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "weight"): ("kv_heads", "embed"),
    ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "weight"): ("embed", "heads"),
    ("gate_proj", "weight"): ("mlp", "embed"),
    ("gate_proj", "bias"): ("mlp",),
    ("up_proj", "weight"): ("mlp", "embed"),
    ("up_proj", "bias"): ("mlp",),
    ("down_proj", "weight"): ("embed", "mlp"),
}


def param_axes(path: tuple[str, ...]) -> tuple[str | None, ...]:
    """The logical axes of the parameter at ``path`` (``("params", "model", ..., "weight")``)."""
    return PARAM_AXES.get(tuple(path[-2:]), ())


def init_variables(config: LlamaConfig, key: jax.Array, dtype: Any = jnp.float32) -> dict:
    """Random ``{"params": ...}`` for ``LlamaForCausalLM(config, dtype)``.

    With ``tie_word_embeddings``, ``lm_head.weight`` is the very array of
    ``model.embed_tokens.weight`` (what the loader does for tied checkpoints).

    Example::

        >>> variables = init_variables(config, jax.random.key(0), jnp.bfloat16)
        >>> variables["params"]["lm_head"]["weight"].shape == (config.vocab_size, config.hidden_size)
        True
    """
    module = LlamaForCausalLM(config, dtype)
    variables = jax.jit(module.init)(key, jnp.zeros((1, 1), jnp.int32))
    params = dict(variables["params"])
    if config.tie_word_embeddings:
        params["lm_head"] = {"weight": params["model"]["embed_tokens"]["weight"]}
    return {"params": params}


__all__ = [
    "LlamaConfig",
    "LlamaRotaryEmbedding",
    "LlamaAttention",
    "LlamaMLP",
    "LlamaDecoderLayer",
    "LlamaModel",
    "LlamaForCausalLM",
    "init_variables",
    "param_axes",
    "rope_inv_freq",
    "rotate_half",
    "apply_rotary_pos_emb",
    "positions_from_mask",
]
