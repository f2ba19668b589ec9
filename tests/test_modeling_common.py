"""The shared model pieces that replace flax and jnp calls for speed keep their results.

``contract`` (one ``dot_general``) must equal ``jnp.einsum`` on the specs the
families use; ``param`` must initialize like ``Module.param`` and still refuse
parameters of the wrong shape, with flax's error.

Bad inputs tried: einsum specs with a summed free axis, an output letter no
operand has, a repeated letter; operands of the wrong rank; a ``Linear`` applied
to a weight of the wrong shape.
"""

from __future__ import annotations

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jnnsight.modeling.common import Linear, RMSNorm, contract

SPECS = [  # the attention contractions of GPT-2 and the Llama family, odd sizes
    ("bqhd,bkhd->bhqk", (2, 3, 4, 5), (2, 6, 4, 5)),
    ("bhqk,bkhd->bqhd", (2, 4, 3, 6), (2, 6, 4, 5)),
    ("bqgrd,bkgd->bgrqk", (2, 3, 2, 3, 5), (2, 7, 2, 5)),
    ("bgrqk,bkgd->bqgrd", (2, 2, 3, 3, 7), (2, 7, 2, 5)),
]


@pytest.mark.parametrize("spec,a,b", SPECS)
def test_contract_equals_einsum(spec, a, b):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=a).astype(np.float32), rng.normal(size=b).astype(np.float32)
    expected = np.einsum(spec, x.astype(np.float64), y.astype(np.float64))
    got = contract(spec, jnp.asarray(x), jnp.asarray(y))
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["ab,bc->a", "ab,bc->acd", "aab,bc->ac"])
def test_contract_refuses_specs_it_cannot_express(spec):
    with pytest.raises(ValueError, match="batch, contracted and free letters"):
        contract(spec, jnp.ones((2, 2, 2)), jnp.ones((2, 2)))


def test_contract_refuses_operands_of_the_wrong_rank():
    with pytest.raises(ValueError, match="rank 3 and 3, got 2 and 3"):
        contract("bqd,bkd->bqk", jnp.ones((3, 4)), jnp.ones((2, 5, 4)))


def test_param_initializes_and_applies_like_flax():
    x = jax.random.normal(jax.random.key(1), (2, 3))
    layer = Linear(5)
    variables = layer.init(jax.random.key(0), x)
    weight, bias = variables["params"]["weight"], variables["params"]["bias"]
    assert weight.shape == (5, 3) and bias.shape == (5,) and not np.any(bias)
    np.testing.assert_allclose(layer.apply(variables, x), x @ weight.T + bias, rtol=1e-6, atol=1e-6)
    norm = RMSNorm()
    assert np.all(norm.init(jax.random.key(0), x)["params"]["weight"] == 1)


def test_param_of_the_wrong_shape_is_flax_shape_error():
    x = jnp.ones((2, 3))
    variables = {"params": {"weight": jnp.ones((5, 4)), "bias": jnp.zeros(5)}}
    with pytest.raises(flax.errors.ScopeParamShapeError, match=r"shape \(5, 3\).*has shape \(5, 4\)"):
        Linear(5).apply(variables, x)
