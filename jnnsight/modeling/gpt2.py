"""GPT-2 in flax.linen, named and laid out like transformers' PyTorch ``modeling_gpt2.py``.

The linen path of every parameter is its Hugging Face checkpoint key with the
layer index joined to the list's name (``transformer.h.0.attn.c_attn.weight``
is ``("transformer", "h_0", "attn", "c_attn", "weight")``), so a checkpoint's
safetensors load through :func:`jnnsight.modeling.common.nest` unchanged, and
ported nnsight code addresses the same places::

    GPT2LMHeadModel
      transformer: GPT2Model
        wte, wpe: Embedding           weight [vocab, n_embd], [n_positions, n_embd]
        h_0 .. h_{n-1}: GPT2Block     returns a tuple; element 0 is the hidden state
          ln_1: LayerNorm
          attn: GPT2Attention         returns (attn_output, attn_weights)
            c_attn, c_proj: Conv1D    weight [in, out], as in Hugging Face
          ln_2: LayerNorm
          mlp: GPT2MLP                returns the MLP output
            c_fc, c_proj: Conv1D
        ln_f: LayerNorm
      lm_head: Linear                 weight [vocab, n_embd], no bias (tied to wte)

Example::

    >>> import jax, jax.numpy as jnp
    >>> from jnnsight import NNsight
    >>> from jnnsight.modeling.gpt2 import GPT2Config, GPT2LMHeadModel, init_variables
    >>> config = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    >>> model = NNsight(GPT2LMHeadModel(config), init_variables(config, jax.random.key(0)))
    >>> ids = jnp.array([[1, 2, 3, 4]])
    >>> with model.trace(ids):
    ...     h = model.transformer.h[-1].output[0].save()
    ...     logits = model.output.logits.save()
    >>> h.shape, logits.shape
    ((1, 4, 32), (1, 4, 101))
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import (Activation, CausalLMOutput, Embedding, LayerNorm, Linear, cache_mask, causal_mask,
                     contract, nan_where_outside, param, project, torch_init, write_cache)

# -- configuration --------------------------------------------------------------------


def _gelu_new(x: jax.Array) -> jax.Array:
    """transformers' ``NewGELUActivation`` (the tanh approximation, as in OpenAI GPT-2)."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACT2FN: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": _gelu_new,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
}

# Hugging Face config.json fields that do not change the forward pass.
_HARMLESS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version",
    "torch_dtype", "dtype", "use_cache", "initializer_range", "n_ctx",
    "attn_pdrop", "embd_pdrop", "resid_pdrop",
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "task_specific_params",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id",
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "use_bfloat16", "chunk_size_feed_forward",
    "is_decoder", "tie_encoder_decoder", "gradient_checkpointing",
    "_attn_implementation_autoset", "n_special", "predict_special_tokens",
    # generation settings that older configs carry
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})

# Fields that are harmless only at these values (the model would be another one otherwise).
_MUST_BE = {
    "add_cross_attention": False,
    "is_encoder_decoder": False,
    "pruned_heads": {},
    "cross_attention_hidden_size": None,
}

# transformers' ``attribute_map``: generic names for GPT-2's own.
_ALIASES = {
    "hidden_size": "n_embd",
    "max_position_embeddings": "n_positions",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2's shape and numerics; the defaults are GPT-2 small's.

    Attributes:
      vocab_size: rows of ``wte`` and ``lm_head``.
      n_positions: rows of ``wpe`` (the longest sequence).
      n_embd: the residual width.
      n_layer: number of blocks ``h_0 .. h_{n_layer-1}``.
      n_head: attention heads (``n_embd`` must divide by it).
      n_inner: the MLP width; ``None`` means ``4 * n_embd``.
      layer_norm_epsilon: the LayerNorms' epsilon.
      activation_function: the MLP activation, a key of :data:`ACT2FN`.
      scale_attn_weights: divide attention scores by ``sqrt(head_dim)``.
      tie_word_embeddings: ``lm_head.weight`` is ``transformer.wte.weight``.
      scale_attn_by_inverse_layer_idx: also divide block ``i``'s scores by ``i + 1``.
      reorder_and_upcast_attn: compute ``q @ k`` in float32 (matters for bfloat16 only).

    Example::

        >>> GPT2Config(n_layer=2, n_embd=32, n_head=4).head_dim
        8
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    tie_word_embeddings: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})."
            )
        if self.activation_function not in ACT2FN:
            raise ValueError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"use one of {sorted(ACT2FN)}."
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "GPT2Config":
        """Read a Hugging Face ``config.json`` dict.

        Fields that do not change the forward pass (dropout, token ids,
        ``architectures``, ``task_specific_params``, ...) are ignored; any other
        field this class does not know is ignored with a warning.

        Example::

            >>> # config = GPT2Config.from_hf(json.load(open("gpt2/config.json")))
            >>> config = GPT2Config.from_hf({"model_type": "gpt2", "n_embd": 64, "n_head": 2,
            ...                              "n_layer": 2, "attn_pdrop": 0.1})
            >>> config.n_embd, config.n_layer
            (64, 2)
        """
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in config.items():
            name = _ALIASES.get(key, key)
            if name in names:
                kwargs[name] = value
            elif key in _MUST_BE:
                if value != _MUST_BE[key] and not (value is None and _MUST_BE[key] == {}):
                    unknown.append(f"{key}={value!r}")
            elif key not in _HARMLESS:
                unknown.append(key)
        model_type = config.get("model_type", "gpt2")
        if model_type != "gpt2":
            warnings.warn(f"GPT2Config.from_hf: reading a {model_type!r} config as GPT-2.",
                          stacklevel=2)
        if unknown:
            warnings.warn(
                "GPT2Config.from_hf ignores config fields it does not support: "
                + ", ".join(unknown) + "; the model may not match the checkpoint.",
                stacklevel=2,
            )
        return cls(**kwargs)


# -- modules ---------------------------------------------------------------------------


def inference_dropout() -> nn.Dropout:
    """transformers' ``nn.Dropout`` modules (``drop``, ``attn_dropout``, ``resid_dropout``,
    ``mlp.dropout``) as they run in inference, the identity: they are sites, as in
    nnsight, and ``attn.attn_dropout.output`` holds the attention weights the values
    are multiplied with (so its ``.grad`` counts that use)."""
    return nn.Dropout(rate=0.0, deterministic=True)


class Conv1D(nn.Module):
    """transformers' ``Conv1D``: a linear layer whose ``weight`` is ``[in, out]``.

    ``y = x @ weight + bias``.

    Example::

        >>> layer = Conv1D(features=6)
        >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 4)))
        >>> variables["params"]["weight"].shape
        (4, 6)
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = param(self, "weight", torch_init(), (x.shape[-1], self.features), self.dtype)
        bias = param(self, "bias", nn.initializers.zeros, (self.features,), self.dtype)
        return project(x, weight, contract=0) + bias.astype(x.dtype)


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention; returns ``(attn_output, attn_weights)``.

    ``attn_weights`` is ``[batch, heads, q, k]`` after the softmax, as transformers'
    eager attention returns it, and passes ``attn_dropout`` (the identity in inference)
    on its way to the product with the values, as in transformers 4: that module's
    output is the site whose ``.grad`` counts the product. Scores are masked and soft-maxed in float32;
    masked scores are ``finfo(float32).min`` so fully padded rows stay finite.
    Given a ``layer_past`` cache (generation), the new keys and values are
    written at ``cache_position`` and the updated cache comes third:
    ``(attn_output, attn_weights, (keys, values))``.

    Example::

        >>> attn = GPT2Attention(GPT2Config(n_embd=32, n_head=4))
        >>> x = jnp.ones((1, 5, 32))
        >>> out, weights = attn.apply(attn.init(jax.random.key(0), x), x)
        >>> out.shape, weights.shape
        ((1, 5, 32), (1, 4, 5, 5))
    """

    config: GPT2Config
    layer_idx: int = 0
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.c_attn = Conv1D(3 * c.n_embd, dtype=self.dtype)
        self.c_proj = Conv1D(c.n_embd, dtype=self.dtype)
        self.attn_dropout = inference_dropout()
        self.resid_dropout = inference_dropout()

    def __call__(
        self,
        hidden_states: jax.Array,
        attention_mask: jax.Array | None = None,
        layer_past: tuple[jax.Array, jax.Array] | None = None,
        cache_position: jax.Array | None = None,
    ) -> tuple[Any, ...]:
        """``attention_mask``: ``[batch, 1, q, k]`` booleans (True: visible); ``None``: causal."""
        c = self.config
        b, t, _ = hidden_states.shape
        query, key, value = jnp.split(self.c_attn(hidden_states), 3, axis=-1)
        query, key, value = (a.reshape(b, t, c.n_head, c.head_dim) for a in (query, key, value))
        present = None
        if layer_past is not None:
            key, value = present = write_cache(layer_past, key, value, cache_position)

        scaling = c.head_dim**-0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scaling /= float(self.layer_idx + 1)
        if c.reorder_and_upcast_attn:
            query, key = query.astype(jnp.float32), key.astype(jnp.float32)
        scores = contract("bqhd,bkhd->bhqk", query, key) * scaling

        if attention_mask is None:
            attention_mask = causal_mask(jnp.ones((b, t), bool))
        scores = scores.astype(jnp.float32)
        scores = jnp.where(attention_mask, scores, jnp.finfo(jnp.float32).min)
        attn_weights = self.attn_dropout(jax.nn.softmax(scores, axis=-1).astype(value.dtype))

        attn_output = contract("bhqk,bkhd->bqhd", attn_weights, value)
        attn_output = self.resid_dropout(self.c_proj(attn_output.reshape(b, t, c.n_embd)))
        return (attn_output, attn_weights) if present is None else (attn_output, attn_weights, present)


class GPT2MLP(nn.Module):
    """``c_proj(act(c_fc(x)))``; returns the array. ``act`` is a module (its output,
    the MLP's neurons, is a site).

    Example::

        >>> mlp = GPT2MLP(GPT2Config(n_embd=32, n_head=4))
        >>> x = jnp.ones((1, 5, 32))
        >>> mlp.apply(mlp.init(jax.random.key(0), x), x).shape
        (1, 5, 32)
    """

    config: GPT2Config
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.c_fc = Conv1D(c.inner_dim, dtype=self.dtype)
        self.c_proj = Conv1D(c.n_embd, dtype=self.dtype)
        self.act = Activation(ACT2FN[c.activation_function])
        self.dropout = inference_dropout()

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class GPT2Block(nn.Module):
    """A pre-LayerNorm transformer block; returns ``(hidden_states,)``.

    The tuple is transformers 4.x's block output, so ``block.output[0]`` is the
    hidden state as in nnsight code written for Hugging Face GPT-2. With a
    ``layer_past`` cache (generation) it is ``(hidden_states, (keys, values))``.

    Example::

        >>> block = GPT2Block(GPT2Config(n_embd=32, n_head=4))
        >>> x = jnp.ones((1, 5, 32))
        >>> block.apply(block.init(jax.random.key(0), x), x)[0].shape
        (1, 5, 32)
    """

    config: GPT2Config
    layer_idx: int = 0
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.ln_1 = LayerNorm(eps=c.layer_norm_epsilon, dtype=self.dtype)
        self.attn = GPT2Attention(c, layer_idx=self.layer_idx, dtype=self.dtype)
        self.ln_2 = LayerNorm(eps=c.layer_norm_epsilon, dtype=self.dtype)
        self.mlp = GPT2MLP(c, dtype=self.dtype)

    def __call__(
        self,
        hidden_states: jax.Array,
        attention_mask: jax.Array | None = None,
        layer_past: tuple[jax.Array, jax.Array] | None = None,
        cache_position: jax.Array | None = None,
    ) -> tuple[Any, ...]:
        residual = hidden_states
        attn = self.attn(self.ln_1(hidden_states), attention_mask, layer_past, cache_position)
        hidden_states = attn[0] + residual

        residual = hidden_states
        hidden_states = residual + self.mlp(self.ln_2(hidden_states))
        return (hidden_states,) if layer_past is None else (hidden_states, attn[2])


def _position_ids(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """``arange(T)``, or with a mask each real token's index among its row's real tokens."""
    t = input_ids.shape[-1]
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(t), input_ids.shape)
    return jnp.clip(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class GPT2Model(nn.Module):
    """Embeddings, blocks and the final LayerNorm; returns ``(last_hidden_state,)``.

    The tuple is what transformers returns with ``return_dict=False``, so
    ``model.transformer.output[0]`` is the final hidden state (after ``ln_f``).
    With ``past_key_values`` (generation; ``attention_mask`` over all cache
    slots and ``position_ids`` given) it is ``(last_hidden_state, past_key_values)``.

    Example::

        >>> config = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        >>> model = GPT2Model(config)
        >>> ids = jnp.array([[1, 2, 3]])
        >>> model.apply(model.init(jax.random.key(0), ids), ids)[0].shape
        (1, 3, 32)
    """

    config: GPT2Config
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.wte = Embedding(c.vocab_size, c.n_embd, dtype=self.dtype)
        self.wpe = Embedding(c.n_positions, c.n_embd, dtype=self.dtype)
        self.drop = inference_dropout()
        self.h = [GPT2Block(c, layer_idx=i, dtype=self.dtype) for i in range(c.n_layer)]
        self.ln_f = LayerNorm(eps=c.layer_norm_epsilon, dtype=self.dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        past_key_values: tuple[tuple[jax.Array, jax.Array], ...] | None = None,
        cache_position: jax.Array | None = None,
    ) -> tuple[Any, ...]:
        if past_key_values is not None and (position_ids is None or attention_mask is None):
            raise ValueError("with past_key_values, pass attention_mask (over all cache slots) "
                             "and position_ids.")
        if position_ids is None:
            position_ids = _position_ids(input_ids, attention_mask)
        c = self.config
        hidden_states = self.wte(input_ids) + self.wpe(position_ids)
        for ids, size in ((input_ids, c.vocab_size), (position_ids, c.n_positions)):
            hidden_states = nan_where_outside(hidden_states, ids, size, attention_mask)
        hidden_states = self.drop(hidden_states)

        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        if past_key_values is None:
            mask = causal_mask(attention_mask)
        else:
            mask = cache_mask(attention_mask, cache_position, input_ids.shape[1])

        presents = []
        for i, block in enumerate(self.h):
            past = None if past_key_values is None else past_key_values[i]
            out = block(hidden_states, mask, past, cache_position)
            hidden_states = out[0]
            if past is not None:
                presents.append(out[1])
        hidden_states = self.ln_f(hidden_states)
        return (hidden_states,) if past_key_values is None else (hidden_states, tuple(presents))


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its language-model head: token ids to ``CausalLMOutput(logits=...)``.

    Args (of ``__call__``):
      input_ids: ``[batch, length]`` integer token ids.
      attention_mask: ``[batch, length]``, 1 for real tokens, 0 for (left) padding.
      position_ids: ``[batch, length]``; by default ``arange(length)``, or with an
        ``attention_mask`` each token's index among its row's real tokens, so a
        left-padded row gives the numbers of its prompt alone.

    ``dtype`` is the parameter and compute dtype (float32 or bfloat16); LayerNorm
    statistics and the attention softmax are computed in float32.

    Example::

        >>> config = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        >>> module = GPT2LMHeadModel(config)
        >>> variables = init_variables(config, jax.random.key(0))
        >>> ids = jnp.array([[0, 0, 5, 6], [1, 2, 3, 4]])
        >>> mask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])
        >>> module.apply(variables, ids, attention_mask=mask).logits.shape
        (2, 4, 101)
    """

    # Its modules and calls do not depend on input sizes: jnnsight may discover its
    # sites once on symbolic sizes (jnnsight.nnsight.SYMBOLIC_SIZES).
    jnnsight_symbolic_sizes: ClassVar[bool] = True

    config: GPT2Config
    dtype: Any = jnp.float32

    def setup(self):
        self.transformer = GPT2Model(self.config, dtype=self.dtype)
        self.lm_head = Linear(self.config.vocab_size, use_bias=False, dtype=self.dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        past_key_values: tuple[tuple[jax.Array, jax.Array], ...] | None = None,
        cache_position: jax.Array | None = None,
    ) -> CausalLMOutput:
        out = self.transformer(input_ids, attention_mask, position_ids, past_key_values,
                               cache_position)
        presents = out[1] if past_key_values is not None else None
        return CausalLMOutput(logits=self.lm_head(out[0]), past_key_values=presents)

    def cache_shapes(self, batch: int, slots: int) -> tuple[tuple[jax.ShapeDtypeStruct, ...], ...]:
        """The ``past_key_values`` of a generation: ``(keys, values)`` per layer."""
        c = self.config
        one = jax.ShapeDtypeStruct((batch, slots, c.n_head, c.head_dim), self.dtype)
        return tuple((one, one) for _ in range(c.n_layer))


# Logical axes of each parameter, by its last path parts; the rest (LayerNorms) replicate.
# Activations: hidden states are ("batch", "length", "embed"), logits ("batch", "length", "vocab").
PARAM_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    ("wte", "weight"): ("vocab", "embed"),
    ("wpe", "weight"): (None, "embed"),
    ("lm_head", "weight"): ("vocab", "embed"),
    ("c_attn", "weight"): ("embed", "heads"),
    ("c_attn", "bias"): ("heads",),
    ("attn", "c_proj", "weight"): ("heads", "embed"),
    ("c_fc", "weight"): ("embed", "mlp"),
    ("c_fc", "bias"): ("mlp",),
    ("mlp", "c_proj", "weight"): ("mlp", "embed"),
}


def param_axes(path: tuple[str, ...]) -> tuple[str | None, ...]:
    """The logical axes of the parameter at ``path`` (``("params", "transformer", ..., "weight")``)."""
    return PARAM_AXES.get(tuple(path[-3:]), PARAM_AXES.get(tuple(path[-2:]), ()))


@functools.lru_cache(maxsize=16)
def _init_fn(config: GPT2Config, dtype: Any) -> Callable[..., Any]:
    """``module.init`` compiled once per config and dtype."""
    return jax.jit(GPT2LMHeadModel(config, dtype=dtype).init)


def init_variables(config: GPT2Config, key: jax.Array, dtype: Any = jnp.float32) -> dict:
    """Random variables ``{"params": ...}`` for :class:`GPT2LMHeadModel`.

    With ``config.tie_word_embeddings``, ``params["lm_head"]["weight"]`` is the
    very same array object as ``params["transformer"]["wte"]["weight"]``, as the
    checkpoint loader makes it.

    Example::

        >>> config = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        >>> params = init_variables(config, jax.random.key(0))["params"]
        >>> params["lm_head"]["weight"] is params["transformer"]["wte"]["weight"]
        True
    """
    variables = _init_fn(config, jnp.dtype(dtype))(key, jnp.zeros((1, 1), jnp.int32))
    params = jax.tree_util.tree_map(lambda x: x, dict(variables["params"]))
    if config.tie_word_embeddings:
        params["lm_head"] = {"weight": params["transformer"]["wte"]["weight"]}
    return {"params": params}
