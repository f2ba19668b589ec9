"""Sharding: the rules in this process, and whole runs on 8 simulated CPU devices in a
subprocess (JAX fixes its device count at start), against the one-device run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from jnnsight.modeling import gpt2, llama
from jnnsight.sharding import DEFAULT_RULES, spec_for

MESH = AbstractMesh((2, 4), ("data", "model"))


def test_default_rules_shard_heads_mlp_and_vocabulary_on_the_model_axis():
    assert spec_for(llama.param_axes(("params", "lm_head", "weight")), (128, 64), MESH) == \
        PartitionSpec("model", None)
    assert spec_for(llama.param_axes(("params", "model", "layers_0", "mlp", "down_proj", "weight")),
                    (64, 256), MESH) == PartitionSpec(None, "model")
    assert spec_for(llama.param_axes(("params", "model", "norm", "weight")), (64,), MESH) == \
        PartitionSpec()
    assert spec_for(gpt2.param_axes(("params", "transformer", "h_0", "attn", "c_proj", "weight")),
                    (64, 64), MESH) == PartitionSpec("model", None)
    assert spec_for(gpt2.param_axes(("params", "transformer", "h_0", "mlp", "c_proj", "weight")),
                    (256, 64), MESH) == PartitionSpec("model", None)
    assert spec_for(("batch", None), (6, 5), MESH) == PartitionSpec("data", None)


def test_an_axis_that_does_not_divide_or_does_not_exist_is_replicated():
    assert spec_for(("vocab", "embed"), (101, 64), MESH) == PartitionSpec(None, None)
    assert spec_for(("batch", None), (3, 5), MESH) == PartitionSpec(None, None)
    assert spec_for(("vocab", "embed"), (128, 64), AbstractMesh((8,), ("data",))) == \
        PartitionSpec(None, None)
    rules = (("vocab", None), ("embed", "model"))  # a user's own rules
    assert spec_for(("vocab", "embed"), (128, 64), MESH, rules) == PartitionSpec(None, "model")
    assert spec_for(("heads", "mlp"), (64, 64), MESH, DEFAULT_RULES) == PartitionSpec("model", None)


def test_a_rule_may_split_one_dimension_over_several_mesh_axes():
    rules = (("batch", ("data", "model")), ("embed", "model"))
    assert spec_for(("batch", None), (8, 5), MESH, rules) == PartitionSpec(("data", "model"), None)
    assert spec_for(("batch", None), (6, 5), MESH, rules) == PartitionSpec(None, None)
    # an axis an earlier dimension took is not used twice
    assert spec_for(("batch", "embed"), (8, 64), MESH, rules) == PartitionSpec(("data", "model"), None)
    assert spec_for(("embed", "batch"), (64, 8), MESH, rules) == PartitionSpec("model", None)
    # a tuple needs every one of its axes: a missing one replicates the dimension
    assert spec_for(("batch", None), (8, 5), MESH, (("batch", ("data", "fsdp")),)) == \
        PartitionSpec(None, None)
    with pytest.raises(ValueError, match="twice"):
        spec_for(("batch",), (8,), MESH, (("batch", ("data", "data")),))


def test_logical_axes_of_another_rank_replicate_the_parameter():
    assert spec_for(("vocab", "embed"), (128,), MESH) == PartitionSpec()
    assert spec_for(("vocab",), (128, 64), MESH) == PartitionSpec()


def test_meshes_of_8_devices_give_the_numbers_of_one_device():
    script = Path(__file__).with_name("multidevice_check.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count(": ok;") == 3 and "tied embeddings: ok" in done.stdout
    assert "all meshes ok" in done.stdout


def test_bad_mesh_and_rules_arguments_are_clear():
    """Bad inputs tried: a tuple for mesh=, rules that are not pairs or map to a number, a
    logical axis given two rules, a mesh whose axes no rule names (every parameter would
    be replicated: a warning), an integer weight loaded into shards."""
    import jax

    from jnnsight import LanguageModel

    folder = Path(__file__).resolve().parents[1] / "models" / "tiny-llama"
    with pytest.raises(TypeError, match=r"mesh= takes a jax.sharding.Mesh, got \(2, 4\)"):
        LanguageModel(folder, mesh=(2, 4))
    one = jax.make_mesh((1,), ("model",))
    for rules in (["mlp"], "mlp", [("mlp",)], [("mlp", 1)], [("mlp", ("model", 2))]):
        with pytest.raises(TypeError, match="rules= takes"):
            LanguageModel(folder, mesh=one, rules=rules)
    with pytest.raises(ValueError, match=r"test_sharding.py:\d+:[\s\S]*names the logical axis 'mlp' more than once"):
        LanguageModel(folder, mesh=one, rules=(("mlp", "model"), ("mlp", None)))
    with pytest.warns(UserWarning, match=r"no sharding rule names an axis of this mesh \('tp',\)") as caught:
        LanguageModel(folder, mesh=jax.make_mesh((1,), ("tp",)))
    assert caught[0].filename == __file__
    # a typo in a rule would replicate that dimension quietly
    two = jax.make_mesh((1, 1), ("data", "model"))
    for rules, match in (((("batch", "data"), ("mlps", "model")), r"logical axes no model family has: \['mlps'\]"),
                         ((("batch", "data"), ("mlp", "modle")), r"mesh axes this mesh lacks: \['modle'\]")):
        with pytest.warns(UserWarning, match=match) as caught:
            LanguageModel(folder, mesh=two, rules=rules)
        assert caught[0].filename == __file__


def test_loading_into_shards_checks_and_keeps_dtypes_as_an_eager_load_does(tmp_path):
    """An integer weight is refused (it loaded and was multiplied as int8), and
    ``dtype=None`` keeps the stored type (it gave float32)."""
    import jax
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from jnnsight import LanguageModel
    from jnnsight.loading import CheckpointError

    folder = Path(__file__).resolve().parents[1] / "models" / "tiny-llama"
    tensors = load_file(folder / "model.safetensors")
    one = jax.make_mesh((1,), ("model",))
    for name, change in (("int8", lambda t: np.round(t * 10).astype(np.int8)),
                         ("bfloat16", lambda t: t.astype(jax.numpy.bfloat16))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((folder / "config.json").read_text())
        key = "model.layers.0.mlp.down_proj.weight"
        changed = {k: change(v) if name == "bfloat16" or k == key else v for k, v in tensors.items()}
        save_file(changed, tmp_path / name / "model.safetensors")
    for mesh in (None, one):
        with pytest.raises(CheckpointError, match=r"integer weights model.layers.0.mlp.down_proj.weight int8"):
            LanguageModel(tmp_path / "int8", mesh=mesh)
        kept = LanguageModel(tmp_path / "bfloat16", mesh=mesh, dtype=None)
        assert {x.dtype for x in jax.tree_util.tree_leaves(kept.variables)} == {np.dtype(jax.numpy.bfloat16)}
