"""Pieces every model family shares, named and laid out as in Hugging Face PyTorch.

Parameters keep PyTorch's names and layouts (``weight`` of a ``Linear`` is
``[out, in]``), so a checkpoint loads without renaming or transposing, and the
module path of a parameter is its checkpoint key with list indices joined to
the list's name (``model.layers.0.mlp`` is the linen path
``("model", "layers_0", "mlp")``).

Example::

    >>> path_of("model.layers.12.self_attn.q_proj.weight")
    ('model', 'layers_12', 'self_attn', 'q_proj', 'weight')
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

@functools.partial(jax.tree_util.register_dataclass, data_fields=["logits", "past_key_values"],
                   meta_fields=[])
@dataclasses.dataclass
class CausalLMOutput:
    """What a causal language model returns: ``output.logits`` is ``[batch, length, vocab]``.

    ``past_key_values`` is the updated key/value cache when the call was given
    one (generation), one ``(keys, values)`` pair per layer; None otherwise.
    Its fields can be assigned, so a block writes ``lm.output.logits = v`` as in
    nnsight (or ``lm.output["logits"] = v``, as transformers' outputs allow).
    """

    logits: jax.Array
    past_key_values: Any = None

    def replace(self, **fields: Any) -> "CausalLMOutput":
        """A copy with ``fields`` replaced, as ``flax.struct`` dataclasses give."""
        return dataclasses.replace(self, **fields)

    def save(self, gather: bool = False) -> "CausalLMOutput":
        """Keep this output after a trace block, as ``jnnsight.save(output, gather)`` does."""
        from ..tracing.program import current

        builder = current()
        return self if builder is None else builder.save(self, gather=gather)

    # transformers' ModelOutput is a dict of the fields that are set; so is this.

    def keys(self) -> tuple[str, ...]:
        return tuple(k for k in ("logits", "past_key_values") if getattr(self, k) is not None)

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self.keys())

    def items(self) -> tuple[tuple[str, Any], ...]:
        return tuple(zip(self.keys(), self.values()))

    def to_tuple(self) -> tuple[Any, ...]:
        return self.values()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __getitem__(self, key: str | int | slice) -> Any:
        """``output["logits"]`` or ``output[0]`` (numbers index the fields that are set)."""
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{key!r}: this output has {list(self.keys())}.")
            return getattr(self, key)
        return self.values()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in ("logits", "past_key_values"):
            raise KeyError(f"{key!r}: this output's fields are 'logits' and 'past_key_values'.")
        setattr(self, key, value)


class Activation(nn.Module):
    """An elementwise activation as a module of its own, so that its output is a site:
    transformers' ``mlp.act_fn`` (Llama) and ``mlp.act`` (GPT-2), the MLP's neurons.

    Example::

        >>> with lm.trace(ids):
        ...     neurons = lm.model.layers[3].mlp.act_fn.output.save()
    """

    function: Callable[[jax.Array], jax.Array]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.function(x)


def path_of(key: str) -> tuple[str, ...]:
    """A checkpoint key as a linen path: ``layers.0`` becomes ``layers_0``."""
    parts: list[str] = []
    for part in key.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b.0.w": x}`` as the nested ``{"a": {"b_0": {"w": x}}}`` linen expects."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = path_of(key)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def param(module: nn.Module, name: str, init: Callable[..., jax.Array],
          shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """``module.param(name, init, shape, dtype)``, minus flax's per-call shape probe.

    Given an existing parameter, flax's ``param`` runs ``jax.eval_shape`` of the
    initializer to check its shape: about a millisecond per parameter, a third
    of the time ``jax.jit`` takes to trace SmolLM2 at each new input shape. The
    shape is known here, so it is compared directly; the error is flax's own.

        >>> # inside a module's __call__:
        >>> # weight = param(self, "weight", torch_init(), (out, d), self.dtype)
    """
    if not module.has_variable("params", name):
        return module.param(name, init, shape, dtype)
    value = module.get_variable("params", name)
    if np.shape(value) != tuple(shape):
        raise flax.errors.ScopeParamShapeError(
            name, module.scope.path_text, np.shape(value), tuple(shape))
    return value


def project(x: jax.Array, weight: jax.Array, contract: int) -> jax.Array:
    """``x``'s last axis contracted with axis ``contract`` of the 2-D ``weight``.

    The ``dot_general`` that ``jnp.einsum("...i,oi->...o", x, weight)`` (``contract=1``)
    or ``"...i,io->...o"`` (``contract=0``) lowers to, without einsum's own
    ``jax.jit`` and path search, which cost about 0.7 ms per call each time
    ``jax.jit`` traces the model at a new input shape.

        >>> project(jnp.ones((2, 3)), jnp.ones((5, 3)), contract=1).shape
        (2, 5)
    """
    weight = weight.astype(x.dtype)
    return jax.lax.dot_general(x, weight, (((x.ndim - 1,), (contract,)), ((), ())))


@functools.lru_cache(maxsize=None)
def _contraction(spec: str) -> tuple[Any, tuple[int, ...], tuple[int, int]]:
    inputs, out = spec.split("->")
    a, b = inputs.split(",")
    once = [c for c in a + b if (c in a) != (c in b)]
    if any(len(set(s)) != len(s) for s in (a, b, out)) or set(out) - set(a + b) \
            or set(once) - set(out):
        raise ValueError(f"contract supports batch, contracted and free letters only: {spec!r}")
    batch = [c for c in out if c in a and c in b]
    summed = [c for c in a if c in b and c not in out]
    dims = ((tuple(a.index(c) for c in summed), tuple(b.index(c) for c in summed)),
            (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)))
    natural = batch + [c for c in a if c not in b] + [c for c in b if c not in a]
    return dims, tuple(natural.index(c) for c in out), (len(a), len(b))


def contract(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, x, y)`` for two operands, as one ``dot_general`` and a transpose.

    Same result as einsum, without its per-shape ``jax.jit`` and path search
    (see :func:`project`). Every letter is a batch letter (in both operands and
    the output), a contracted one (in both operands only), or a free one (in
    one operand and the output).

        >>> contract("bqd,bkd->bqk", jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4))).shape
        (2, 3, 5)
    """
    dims, order, ranks = _contraction(spec)
    if (x.ndim, y.ndim) != ranks:
        raise ValueError(f"contract {spec!r} takes operands of rank {ranks[0]} and {ranks[1]}, "
                         f"got {x.ndim} and {y.ndim}")
    z = jax.lax.dot_general(x, y, dims)
    return z if order == tuple(range(z.ndim)) else z.transpose(order)


def torch_init(std: float = 0.02) -> Callable[..., jax.Array]:
    return nn.initializers.normal(std)


class Linear(nn.Module):
    """``torch.nn.Linear``: ``weight`` is ``[out, in]``; ``y = x @ weight.T + bias``."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = param(self, "weight", torch_init(), (self.features, x.shape[-1]), self.dtype)
        y = project(x, weight, contract=1)
        if self.use_bias:
            bias = param(self, "bias", nn.initializers.zeros, (self.features,), self.dtype)
            y = y + bias.astype(x.dtype)
        return y


class Embedding(nn.Module):
    """``torch.nn.Embedding``: ``weight`` is ``[vocab, width]``."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32

    def setup(self):
        shape = (self.num_embeddings, self.features)
        self.weight = param(self, "weight", torch_init(), shape, self.dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        # "clip", not the default NaN fill: a NaN at a padded position would reach
        # real rows through masked attention (0 * NaN).
        return jnp.take(self.weight, ids, axis=0, mode="clip")

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: ``x @ weight.T``."""
        return project(x, self.weight, contract=1)


def nan_where_outside(hidden: jax.Array, ids: jax.Array, size: int,
                      attention_mask: jax.Array | None) -> jax.Array:
    """``hidden`` with NaN at the real tokens whose id (or position) is outside ``0 .. size - 1``.

    An embedding lookup clips such ids (a JAX gather does not fail), which would
    give plausible wrong numbers. Concrete inputs are refused before the forward
    (``LanguageModel._check_ids``); ids known only inside a ``jax.jit`` come out
    as NaN instead. Padded positions (mask 0) keep their clipped lookup: a NaN
    there would reach real rows through masked attention (0 * NaN). A mask that
    covers a KV cache's slots, not these tokens, leaves every token as it is.

    Example::

        >>> hidden = nan_where_outside(self.embed_tokens(ids), ids, vocab_size, mask)
    """
    outside = (ids < 0) | (ids >= size)
    if attention_mask is not None:
        if attention_mask.shape != ids.shape:
            return hidden
        outside = outside & (attention_mask != 0)
    return jnp.where(outside[..., None], jnp.asarray(jnp.nan, hidden.dtype), hidden)


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm`` with ``weight`` and ``bias``."""

    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        weight = param(self, "weight", nn.initializers.ones, (d,), self.dtype)
        bias = param(self, "bias", nn.initializers.zeros, (d,), self.dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * weight + bias).astype(x.dtype)


class RMSNorm(nn.Module):
    """Llama's RMSNorm: ``weight * x / rms(x)``, computed in float32 like transformers."""

    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = param(self, "weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight * y.astype(x.dtype)


def causal_mask(attention_mask: jax.Array, window: int | None = None) -> jax.Array:
    """``[batch, 1, q, k]`` booleans: key ``k`` is visible from query ``q``.

    Keys must be at or before the query, not padding, and (with a sliding
    ``window``) less than ``window`` positions back, as in transformers.
    """
    t = attention_mask.shape[-1]
    q = jnp.arange(t)[:, None]
    k = jnp.arange(t)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    return allowed[None, None] & attention_mask.astype(bool)[:, None, None, :]


def cache_mask(attention_mask: jax.Array, cache_position: jax.Array, length: int,
               window: int | None = None) -> jax.Array:
    """``[batch, 1, q, slots]`` booleans for ``length`` queries written at ``cache_position``.

    Query ``i`` sits in cache slot ``cache_position + i``; it sees the slots at
    or before its own that ``attention_mask`` ``[batch, slots]`` marks real
    and (with a sliding ``window``) less than ``window`` slots back, as
    :func:`causal_mask` does without a cache.
    """
    slots = attention_mask.shape[-1]
    q = cache_position + jnp.arange(length)[:, None]
    k = jnp.arange(slots)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    return allowed[None, None] & attention_mask.astype(bool)[:, None, None, :]


def write_cache(cache: tuple[jax.Array, jax.Array], keys: jax.Array, values: jax.Array,
                cache_position: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The ``(keys, values)`` cache ``[batch, slots, heads, head_dim]`` with new entries at ``cache_position``."""
    k, v = cache
    return (jax.lax.dynamic_update_slice_in_dim(k, keys.astype(k.dtype), cache_position, axis=1),
            jax.lax.dynamic_update_slice_in_dim(v, values.astype(v.dtype), cache_position, axis=1))
