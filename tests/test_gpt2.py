"""GPT-2 in linen equals transformers' PyTorch GPT-2 on the same (random, N(0, 0.5)) weights.

One tiny model is built in PyTorch, saved with ``save_pretrained`` as safetensors,
and loaded back with ``safetensors.numpy`` and ``common.nest``; logits, left
padding, block outputs and edits through ``jnnsight.NNsight`` are compared with
the PyTorch forward and forward hooks.
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jnnsight
from jnnsight.modeling import common
from jnnsight.modeling.gpt2 import GPT2Config, GPT2LMHeadModel, init_variables

TINY = dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
TOL = 1e-4


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """The torch model, our module and variables, the wrapped model, and 2 x 7 token ids."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        **TINY, bos_token_id=0, eos_token_id=0, attn_implementation="eager"
    )
    torch_model = transformers.GPT2LMHeadModel(hf_config).float().eval()
    with torch.no_grad():
        for p in torch_model.parameters():  # every weight, LayerNorms included
            p.normal_(0.0, 0.5)
    directory = tmp_path_factory.mktemp("gpt2")
    torch_model.save_pretrained(directory, safe_serialization=True)

    with open(directory / "config.json") as f:
        config_json = json.load(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a save_pretrained config reads without warnings
        config = GPT2Config.from_hf(config_json)
    flat = {k: jnp.asarray(v) for k, v in load_file(directory / "model.safetensors").items()}
    if "lm_head.weight" not in flat:
        flat["lm_head.weight"] = flat["transformer.wte.weight"]
    variables = {"params": common.nest(flat)}
    module = GPT2LMHeadModel(config)
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 7))
    return dict(
        torch=torch, torch_model=torch_model, config=config, flat=flat, module=module,
        variables=variables, model=jnnsight.NNsight(module, variables), ids=ids,
        apply=jax.jit(module.apply),
    )


def torch_forward(g, ids, hooks=(), **kwargs):
    """Torch logits and hidden states, with ``(module, hook)`` forward hooks attached."""
    torch = g["torch"]
    handles = [m.register_forward_hook(h) for m, h in hooks]
    try:
        with torch.no_grad():
            kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in kwargs.items()}
            out = g["torch_model"](torch.as_tensor(np.asarray(ids)), output_hidden_states=True,
                                   **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


# -- without torch ----------------------------------------------------------------------


def test_from_hf_reads_gpt2_config_and_warns_on_unknown_fields():
    hub = {  # the gpt2 checkpoint's config.json, abridged
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
        "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
        "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": 50257,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GPT2Config.from_hf(hub) == GPT2Config()
    with pytest.warns(UserWarning, match="rotary_dim.*add_cross_attention=True"):
        config = GPT2Config.from_hf({**hub, "rotary_dim": 64, "add_cross_attention": True})
    assert config.n_layer == 12
    assert GPT2Config.from_hf({"hidden_size": 64, "num_attention_heads": 2}).n_embd == 64


def test_init_variables_ties_lm_head_to_wte_and_uses_checkpoint_names():
    config = GPT2Config(**TINY)
    params = init_variables(config, jax.random.key(0))["params"]
    assert params["lm_head"]["weight"] is params["transformer"]["wte"]["weight"]
    assert params["transformer"]["h_1"]["attn"]["c_attn"]["weight"].shape == (32, 96)
    assert params["transformer"]["h_0"]["mlp"]["c_proj"]["weight"].shape == (128, 32)
    untied = init_variables(GPT2Config(**TINY, tie_word_embeddings=False), jax.random.key(0))
    untied = untied["params"]
    assert untied["lm_head"]["weight"] is not untied["transformer"]["wte"]["weight"]


def test_bfloat16_forward_is_finite_and_near_float32():
    config = GPT2Config(**TINY)
    rng = np.random.default_rng(2)
    variables = jax.tree_util.tree_map(  # N(0, 0.5): default init gives logits near 0
        lambda x: jnp.asarray(rng.normal(0.0, 0.5, x.shape), jnp.float32),
        init_variables(config, jax.random.key(1)))
    ids = jnp.arange(14).reshape(2, 7)
    mask = jnp.array([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    f32 = jax.jit(GPT2LMHeadModel(config).apply)(variables, ids, mask).logits
    bf16_vars = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), variables)
    bf16 = jax.jit(GPT2LMHeadModel(config, dtype=jnp.bfloat16).apply)(bf16_vars, ids, mask).logits
    assert bf16.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(bf16)))
    assert float(jnp.max(jnp.abs(f32))) > 1.0
    assert max_diff(bf16, f32) < 0.05 * float(jnp.max(jnp.abs(f32)))


# -- parity with transformers ----------------------------------------------------------------


def test_parameter_paths_are_the_checkpoint_keys(gpt2):
    params = init_variables(gpt2["config"], jax.random.key(0))["params"]
    ours = {tuple(k.key for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    theirs = {common.path_of(key): value.shape for key, value in gpt2["flat"].items()}
    assert ours == theirs
    text = repr(gpt2["model"])
    assert "h[0-1]" in text and "c_attn" in text and "lm_head" in text


def test_logits_equal_transformers(gpt2):
    ours = gpt2["apply"](gpt2["variables"], gpt2["ids"]).logits
    theirs, _ = torch_forward(gpt2, gpt2["ids"])
    assert np.abs(theirs).max() > 1.0  # weights are not near zero
    assert max_diff(ours, theirs) <= TOL


def test_left_padded_row_equals_its_prompt_alone(gpt2):
    ids = gpt2["ids"].copy()
    ids[1, :3] = 0
    mask = np.array([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    apply = gpt2["apply"]

    ours = apply(gpt2["variables"], ids, mask).logits
    ours_explicit = apply(gpt2["variables"], ids, mask, positions).logits
    theirs, _ = torch_forward(gpt2, ids, attention_mask=mask, position_ids=positions)
    real = mask.astype(bool)
    assert bool(jnp.all(jnp.isfinite(ours)))
    assert max_diff(ours[real], theirs[real]) <= TOL
    assert max_diff(ours, ours_explicit) == 0.0

    ours_alone = apply(gpt2["variables"], ids[1:, 3:]).logits
    theirs_alone, _ = torch_forward(gpt2, ids[1:, 3:])
    assert max_diff(ours[1, 3:], ours_alone[0]) <= TOL
    assert max_diff(theirs[1, 3:], theirs_alone[0]) <= TOL
    ours_row0 = apply(gpt2["variables"], ids[:1]).logits
    assert max_diff(ours[0], ours_row0[0]) <= TOL


# -- interventions through NNsight vs torch hooks ---------------------------------------------


def test_saved_block_outputs_equal_transformers_hidden_states(gpt2):
    model, ids, n = gpt2["model"], gpt2["ids"], gpt2["config"].n_layer
    with model.trace(ids):
        blocks = [model.transformer.h[i].output[0].save() for i in range(n)]
        final = model.transformer.output[0].save()
        logits = model.output.logits.save()

    block_outputs = []

    def record(m, a, out):  # transformers 5 blocks return a tensor, 4.x a tuple
        block_outputs.append((out[0] if isinstance(out, tuple) else out).numpy())

    hooks = [(gpt2["torch_model"].transformer.h[i], record) for i in range(n)]
    theirs, hidden = torch_forward(gpt2, ids, hooks=hooks)
    assert len(hidden) == n + 1
    # hidden_states[0] is the embeddings, [i + 1] block i's output, except the last,
    # which transformers gives after ln_f.
    for i in range(n - 1):
        assert max_diff(blocks[i], hidden[i + 1]) <= TOL
    assert max_diff(final, hidden[n]) <= TOL
    for i in range(n):
        assert max_diff(blocks[i], block_outputs[i]) <= TOL
    assert max_diff(logits, theirs) <= TOL


def test_noise_on_mlp_output_equals_torch_hook(gpt2):
    model, ids = gpt2["model"], gpt2["ids"]
    noise = np.random.default_rng(1).normal(0.0, 1.0, (2, 7, 32)).astype(np.float32)
    with model.trace(ids):
        model.transformer.h[1].mlp.output = model.transformer.h[1].mlp.output + noise
        logits = model.output.logits.save()
    hook = (gpt2["torch_model"].transformer.h[1].mlp,
            lambda m, a, out: out + gpt2["torch"].as_tensor(noise))
    theirs, _ = torch_forward(gpt2, ids, hooks=[hook])
    clean, _ = torch_forward(gpt2, ids)
    assert max_diff(theirs, clean) > 1e-2  # the edit matters
    assert max_diff(logits, theirs) <= TOL


def test_zeroed_block_output_equals_torch_hook(gpt2):
    model, ids = gpt2["model"], gpt2["ids"]
    with model.trace(ids):
        model.transformer.h[0].output[0] = model.transformer.h[0].output[0] * 0
        after = model.transformer.h[0].output[0].save()
        logits = model.output.logits.save()

    def zero(m, a, out):
        return (out[0] * 0,) + tuple(out[1:]) if isinstance(out, tuple) else out * 0

    theirs, _ = torch_forward(gpt2, ids, hooks=[(gpt2["torch_model"].transformer.h[0], zero)])
    assert float(jnp.max(jnp.abs(after))) == 0.0
    assert max_diff(logits, theirs) <= TOL


def test_trace_with_left_padding_mask_equals_torch(gpt2):
    model, ids = gpt2["model"], gpt2["ids"].copy()
    ids[1, :3] = 0
    mask = np.array([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    with model.trace(ids, attention_mask=mask):
        block = model.transformer.h[0].output[0].save()
        logits = model.output.logits.save()

    seen = []
    hook = (gpt2["torch_model"].transformer.h[0],
            lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).numpy()))
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    theirs, _ = torch_forward(gpt2, ids, hooks=[hook], attention_mask=mask, position_ids=positions)
    real = mask.astype(bool)
    assert max_diff(np.asarray(block)[real], seen[0][real]) <= TOL
    assert max_diff(np.asarray(logits)[real], theirs[real]) <= TOL


def test_mlp_neurons_at_act_equal_a_torch_hook(gpt2):
    """`mlp.act` is a module, as in transformers: its output (the neurons) is a site."""
    model, ids = gpt2["model"], gpt2["ids"]
    with model.trace(ids):
        neurons = model.transformer.h[1].mlp.act.output.save()
        model.transformer.h[0].mlp.act.output = model.transformer.h[0].mlp.act.output * 0
        logits = model.output.logits.save()
        also = model.output["logits"].save()
        whole = model.output.save()
    seen = []
    hooks = [(gpt2["torch_model"].transformer.h[1].mlp.act, lambda m, a, o: seen.append(o)),
             (gpt2["torch_model"].transformer.h[0].mlp.act, lambda m, a, o: o * 0)]
    theirs, _ = torch_forward(gpt2, ids, hooks=hooks)
    assert max_diff(neurons, seen[0].numpy()) <= TOL
    assert max_diff(logits, theirs) <= TOL
    assert max_diff(theirs, torch_forward(gpt2, ids)[0]) > 1e-2  # the edit matters
    np.testing.assert_array_equal(also, logits)  # output["logits"], as transformers' ModelOutput
    assert "logits" in whole and list(whole) == ["logits"] and whole[0] is whole["logits"]
    assert dict(whole.items()).keys() == {"logits"} and "past_key_values" not in whole
