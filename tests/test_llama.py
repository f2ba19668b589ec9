"""The Llama family (Llama, Mistral, Qwen2, Qwen3) equals transformers' PyTorch models.

Every case redraws all weights from N(0, 0.5) (the default initialization hides
RoPE and mask bugs), saves the PyTorch model with ``save_pretrained``, loads the
safetensors file and config.json the way a checkpoint is loaded, and compares
logits; interventions through ``NNsight`` are compared with PyTorch forward hooks.
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from jnnsight import NNsight  # noqa: E402
from jnnsight.modeling.common import nest  # noqa: E402
from jnnsight.modeling.llama import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    init_variables,
    rope_inv_freq,
)

TOL = 1e-4
LENGTH = 9
TINY = dict(
    vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# name: (transformers family, config overrides)
CASES = {
    "llama": ("Llama", dict(rope_theta=5000.0)),
    "llama_llama3_tied_biases": ("Llama", dict(
        rope_theta=5000.0, rope_scaling=LLAMA3, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True)),
    "llama_linear": ("Llama", dict(rope_theta=5000.0,
                                   rope_scaling={"rope_type": "linear", "factor": 2.5})),
    "mistral_window": ("Mistral", dict(rope_theta=5000.0, sliding_window=4)),
    # layer 0 full, layer 1 sliding, by layer_types (Ministral-8B's config)
    "ministral_layer_types": ("Ministral", dict(rope_theta=5000.0, sliding_window=4,
                                                layer_types=["full_attention", "sliding_attention"])),
    # layer 0 full, layer 1 sliding (max_window_layers=1); q/k/v biases, tied
    "qwen2_window_tied": ("Qwen2", dict(rope_theta=5000.0, use_sliding_window=True,
                                        sliding_window=4, max_window_layers=1,
                                        tie_word_embeddings=True)),
    "qwen3": ("Qwen3", dict(rope_theta=5000.0, attention_bias=True)),
}


@lru_cache(maxsize=None)
def case(name: str, tmp_root: str):
    """(torch model, config.json dict, linen module, variables) for one case."""
    family, overrides = CASES[name]
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = config_cls(**TINY, **overrides, attn_implementation="eager")
        tm = model_cls(hf_config).eval()
    with torch.no_grad():
        for p in tm.parameters():  # tied weights are one parameter: redrawn once
            p.normal_(0.0, 0.5)
    folder = f"{tmp_root}/{name}"
    tm.save_pretrained(folder)
    with open(f"{folder}/config.json") as f:
        config_json = json.load(f)
    flat = safetensors_numpy.load_file(f"{folder}/model.safetensors")
    config = LlamaConfig.from_hf(config_json)
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in flat
        flat["lm_head.weight"] = flat["model.embed_tokens.weight"]
    variables = {"params": nest({k: jnp.asarray(v) for k, v in flat.items()})}
    return tm, config_json, LlamaForCausalLM(config), variables


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("llama"))


def ids_of(seed: int, batch: int = 2, length: int = LENGTH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, length))


def torch_logits(tm, ids: np.ndarray, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return tm(torch.as_tensor(ids), **kwargs).logits.numpy()


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_transformers_pytorch(name, tmp_root):
    tm, config_json, module, variables = case(name, tmp_root)
    ids = ids_of(1)
    ours = jax.jit(module.apply)(variables, jnp.asarray(ids)).logits
    theirs = torch_logits(tm, ids)
    assert np.abs(theirs).max() > 1.0  # large weights: the comparison is not trivially small
    assert max_diff(ours, theirs) <= TOL, (name, max_diff(ours, theirs))


@pytest.mark.parametrize("name", ["mistral_window", "qwen2_window_tied", "llama_llama3_tied_biases"])
def test_left_padded_rows_equal_solo_rows(name, tmp_root):
    tm, _, module, variables = case(name, tmp_root)
    ids = ids_of(2)
    pad = 3
    padded = ids.copy()
    padded[1, :pad] = 0
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    apply = jax.jit(module.apply)
    batch = apply(variables, jnp.asarray(padded), jnp.asarray(mask)).logits
    solo_long = apply(variables, jnp.asarray(ids[:1])).logits
    solo_short = jax.jit(module.apply)(variables, jnp.asarray(ids[1:, pad:])).logits
    assert max_diff(batch[0], solo_long[0]) <= 1e-5
    assert max_diff(batch[1, pad:], solo_short[0]) <= 1e-5
    assert max_diff(solo_short, torch_logits(tm, ids[1:, pad:])) <= TOL


def test_rope_frequencies_equal_transformers(tmp_root):
    for name in ("llama", "llama_llama3_tied_biases", "llama_linear"):
        tm, config_json, module, _ = case(name, tmp_root)
        theirs = tm.model.rotary_emb.inv_freq.numpy()
        np.testing.assert_allclose(rope_inv_freq(module.config), theirs, rtol=1e-6, atol=0)


def test_old_and_new_config_formats_agree(tmp_root):
    _, new, _, _ = case("llama_llama3_tied_biases", tmp_root)
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    rope = dict(new["rope_parameters"])
    old["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")  # the oldest spelling
    old["rope_scaling"] = rope
    assert LlamaConfig.from_hf(old) == LlamaConfig.from_hf(new)
    assert LlamaConfig.from_hf(new).rope_theta == 5000.0
    assert LlamaConfig.from_hf(new).rope_type == "llama3"


def test_rope_scaling_added_to_a_new_config_wins_as_in_transformers(tmp_root):
    """transformers 5 writes ``rope_parameters``; a ``rope_scaling`` added later takes over."""
    _, new, _, _ = case("llama", tmp_root)
    both = dict(new, rope_scaling={"rope_type": "linear", "factor": 4.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(both))
    ours = LlamaConfig.from_hf(both)
    assert ours.rope_type == "linear"
    np.testing.assert_allclose(rope_inv_freq(ours), theirs.model.rotary_emb.inv_freq.numpy(),
                               rtol=1e-6, atol=0)


def test_a_mistral_config_with_layer_types_windows_only_those_layers_as_transformers(tmp_root):
    """transformers reads it as Ministral: a window on the "sliding_attention" layers only
    (jnnsight windowed every layer, 10 apart in logits past the window)."""
    tm, config_json, _, variables = case("ministral_layer_types", tmp_root)
    as_mistral = dict(config_json, model_type="mistral")
    config = LlamaConfig.from_hf(as_mistral)
    assert (config.window_of(0), config.window_of(1)) == (None, 4)
    ids = ids_of(8)
    logits = LlamaForCausalLM(config).apply(variables, jnp.asarray(ids)).logits
    assert max_diff(logits, torch_logits(tm, ids)) <= TOL


def test_family_switches_from_config_json(tmp_root):
    qwen2 = case("qwen2_window_tied", tmp_root)[2].config
    assert (qwen2.attention_bias, qwen2.attention_out_bias, qwen2.qk_norm) == (True, False, False)
    assert [qwen2.window_of(i) for i in range(2)] == [None, 4]
    mistral = case("mistral_window", tmp_root)[2].config
    assert [mistral.window_of(i) for i in range(2)] == [4, 4]
    qwen3 = case("qwen3", tmp_root)[2].config
    assert qwen3.qk_norm and qwen3.window_of(1) is None
    # Qwen2.5's config.json: a window is written, but use_sliding_window is false
    off = LlamaConfig.from_hf({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
                               "num_hidden_layers": 2, "sliding_window": 131072,
                               "use_sliding_window": False, "max_window_layers": 1})
    assert [off.window_of(i) for i in range(2)] == [None, None]
    assert LlamaConfig.from_hf({"model_type": "mistral", "sliding_window": None}).window_of(0) is None


def test_unsupported_rope_types_say_what_to_do():
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}
    for rope, says in (("dynamic", "set \"rope_scaling\": null"), ("yarn", "with transformers"),
                       ("longrope", "with transformers")):
        with pytest.raises(NotImplementedError, match=f"RoPE type '{rope}'.*{says}"):
            LlamaConfig.from_hf(dict(base, rope_scaling={"rope_type": rope, "factor": 2.0}))


def test_unknown_fields_warn_and_do_not_fail():
    with pytest.warns(UserWarning, match="some_new_knob"):
        config = LlamaConfig.from_hf({"model_type": "llama", "hidden_size": 64,
                                      "num_attention_heads": 4, "some_new_knob": 3,
                                      "torch_dtype": "bfloat16", "pretraining_tp": 1})
    assert config.head_dim == 16


def test_init_variables_ties_and_runs_in_bfloat16():
    config = LlamaConfig(**{**TINY, "tie_word_embeddings": True})
    variables = init_variables(config, jax.random.key(0), jnp.bfloat16)
    params = variables["params"]
    assert params["lm_head"]["weight"] is params["model"]["embed_tokens"]["weight"]
    assert params["model"]["layers_1"]["self_attn"]["q_proj"]["weight"].dtype == jnp.bfloat16
    logits = jax.jit(LlamaForCausalLM(config, jnp.bfloat16).apply)(variables, jnp.asarray(ids_of(3))).logits
    assert logits.dtype == jnp.bfloat16 and logits.shape == (2, LENGTH, TINY["vocab_size"])


def test_patching_one_position_across_invokes_equals_torch_hooks(tmp_root):
    tm, _, module, variables = case("qwen3", tmp_root)
    model = NNsight(module, variables)
    ids = ids_of(4)
    ids_a, ids_b = jnp.asarray(ids[:1]), jnp.asarray(ids[1:])
    with model.trace() as t:
        with t.invoke(ids_a):
            h = model.model.layers[1].output[0][:, -1]
            h_saved = h.save()
        with t.invoke(ids_b):
            model.model.layers[1].output[0] = model.model.layers[1].output[0].at[:, -1].set(h)
            patched = model.lm_head.output.save()

    layer = tm.model.layers[1]
    captured = {}

    def grab(module, args, out):
        captured["h"] = (out[0] if isinstance(out, tuple) else out)[:, -1].clone()

    def patch(module, args, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        hidden[:, -1] = captured["h"]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handle = layer.register_forward_hook(grab)
    torch_logits(tm, ids[:1])
    handle.remove()
    handle = layer.register_forward_hook(patch)
    try:
        theirs = torch_logits(tm, ids[1:])
    finally:
        handle.remove()
    assert max_diff(h_saved, captured["h"].numpy()) <= TOL
    assert max_diff(patched, theirs) <= TOL
    assert max_diff(theirs, torch_logits(tm, ids[1:])) > 1e-2  # the patch changed something


def test_saved_layer_outputs_equal_output_hidden_states(tmp_root):
    tm, _, module, variables = case("mistral_window", tmp_root)
    model = NNsight(module, variables)
    ids = ids_of(5)
    with model.trace(jnp.asarray(ids)):
        embeddings = model.model.embed_tokens.output.save()
        layers = [model.model.layers[i].output[0].save() for i in range(2)]
        normed = model.model.norm.output.save()
        logits = model.lm_head.output.save()
    with torch.no_grad():
        out = tm(torch.as_tensor(ids), output_hidden_states=True)
    hidden = [h.numpy() for h in out.hidden_states]
    # transformers 5: (embeddings, layer 0, ..., layer n-2, norm(layer n-1))
    assert len(hidden) == 3
    assert max_diff(embeddings, hidden[0]) == 0.0
    assert max_diff(layers[0], hidden[1]) <= TOL
    assert max_diff(normed, hidden[2]) <= TOL
    assert max_diff(logits, out.logits.numpy()) <= TOL
    # layer 1's own output, through a torch hook
    seen = []
    handle = tm.model.layers[1].register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        torch_logits(tm, ids)
    finally:
        handle.remove()
    last = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
    assert max_diff(layers[1], last.numpy()) <= TOL


def test_mlp_neurons_at_act_fn_equal_a_torch_hook_and_ablating_them_too(tmp_root):
    """`mlp.act_fn` is a module, as in transformers: its output (the neurons) is a site."""
    tm, _, module, variables = case("llama", tmp_root)
    model = NNsight(module, variables)
    ids = ids_of(6)
    with model.trace(jnp.asarray(ids)):
        neurons = model.model.layers[0].mlp.act_fn.output.save()
        act = model.model.layers[1].mlp.act_fn
        act.output = act.output.at[..., :8].set(0)
        logits = model.lm_head.output.save()
    seen = []

    def ablate(m, a, out):
        out = out.clone()
        out[..., :8] = 0
        return out

    handles = [tm.model.layers[0].mlp.act_fn.register_forward_hook(lambda m, a, o: seen.append(o)),
               tm.model.layers[1].mlp.act_fn.register_forward_hook(ablate)]
    try:
        theirs = torch_logits(tm, ids)
    finally:
        for handle in handles:
            handle.remove()
    assert max_diff(neurons, seen[0].numpy()) <= TOL
    assert max_diff(logits, theirs) <= TOL
    assert max_diff(theirs, torch_logits(tm, ids)) > 1e-2  # the ablation changed something


def test_config_fields_only_other_runtimes_read_do_not_warn_but_unknown_ones_do():
    """SmolLM2's config.json carries `rope_interleaved` and `transformers.js_config`,
    which transformers' Llama does not read either; a field that might matter warns."""
    from jnnsight.modeling.llama import LlamaConfig

    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LlamaConfig.from_hf({**base, "rope_interleaved": False, "transformers.js_config": {}})
    with pytest.warns(UserWarning, match=r"might change the numbers: \['qk_layernorm'\]"):
        LlamaConfig.from_hf({**base, "qk_layernorm": True})
