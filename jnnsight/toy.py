"""A small GPT-style linen transformer for the tour, the tests and the benchmarks.

Module names follow GPT-2's (``wte``, ``wpe``, ``h_0 .. h_{n-1}`` with
``ln_1``, ``attn.c_attn``, ``attn.c_proj``, ``ln_2``, ``mlp.c_fc``,
``mlp.c_proj``, then ``ln_f`` and ``lm_head``), and each block returns a tuple
whose element 0 is the hidden state, as transformers' blocks do, so the
examples read like ported nnsight code. It is not GPT-2 (issue 3 brings the
real families); it is a model of that shape with random weights.

Example::

    >>> from jnnsight.toy import toy_model
    >>> model, tokens = toy_model(layers=2, width=32, heads=4, vocab=64, length=8)
    >>> with model.trace(tokens):
    ...     h = model.h[-1].output[0].save()
    >>> h.shape
    (1, 8, 32)
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from .nnsight import NNsight


@dataclass(frozen=True)
class ToyConfig:
    vocab: int = 64
    width: int = 32
    heads: int = 4
    layers: int = 4
    max_length: int = 64


class Attention(nn.Module):
    config: ToyConfig

    def setup(self):
        self.c_attn = nn.Dense(3 * self.config.width)
        self.c_proj = nn.Dense(self.config.width)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.config.heads
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // h)
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.c_proj(out.reshape(b, t, d))


class MLP(nn.Module):
    config: ToyConfig

    def setup(self):
        self.c_fc = nn.Dense(4 * self.config.width)
        self.c_proj = nn.Dense(self.config.width)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x)))


class Block(nn.Module):
    config: ToyConfig

    def setup(self):
        self.ln_1 = nn.LayerNorm()
        self.attn = Attention(self.config)
        self.ln_2 = nn.LayerNorm()
        self.mlp = MLP(self.config)

    def __call__(self, x: jax.Array) -> tuple[jax.Array]:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return (x,)


class ToyTransformer(nn.Module):
    """Token ids ``[batch, length]`` to logits ``[batch, length, vocab]``."""

    config: ToyConfig

    def setup(self):
        c = self.config
        self.wte = nn.Embed(c.vocab, c.width)
        self.wpe = nn.Embed(c.max_length, c.width)
        self.h = [Block(c) for _ in range(c.layers)]
        self.ln_f = nn.LayerNorm()
        self.lm_head = nn.Dense(c.vocab, use_bias=False)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))
        for block in self.h:
            x = block(x)[0]
        return self.lm_head(self.ln_f(x))


def toy_model(
    layers: int = 4, width: int = 32, heads: int = 4, vocab: int = 64,
    length: int = 8, batch: int = 1, seed: int = 0,
) -> tuple[NNsight, jax.Array]:
    """A wrapped toy transformer with random weights, and random token ids."""
    config = ToyConfig(vocab=vocab, width=width, heads=heads, layers=layers,
                       max_length=max(64, length))
    module = ToyTransformer(config)
    key_tokens, key_init = jax.random.split(jax.random.key(seed))
    tokens = jax.random.randint(key_tokens, (batch, length), 0, vocab)
    variables = module.init(key_init, tokens)
    return NNsight(module, variables), tokens
