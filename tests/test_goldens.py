"""Parity with transformers' PyTorch models, without torch: the golden files in models/.

``scripts/make_goldens.py`` saved, per family, a tiny PyTorch checkpoint with
N(0, 0.5) weights (``config.json`` + ``model.safetensors``) and the logits torch
computed for fixed token ids (``golden.npz``, described in ``golden.json``).
Here each checkpoint is loaded the way ``jnnsight.loading.load_pretrained``
loads one (a tiny checkpoint has no tokenizer, so the same steps are taken
without it) and its logits are compared with torch's, plain and left-padded,
through the module and through ``NNsight`` / ``LanguageModel`` traces.

Nothing here imports torch; where torch and transformers are installed,
``test_installed_transformers_still_gives_the_goldens`` also reruns the stored
checkpoints in PyTorch (the live comparisons are in test_gpt2.py and test_llama.py).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jnnsight
from jnnsight.loading import load_config
from jnnsight.loading.pretrained import load_model

MODELS = Path(__file__).resolve().parents[1] / "models"
# Named, not globbed: a missing folder fails instead of shrinking the test list.
FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3"]
TOL = 1e-4
MAX_FOLDER_BYTES = 1 << 20
GOLDEN_KEYS = {"ids", "logits", "padded_ids", "padded_mask", "padded_positions", "padded_logits"}


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@lru_cache(maxsize=None)
def golden(family: str):
    """``(module, variables, config.json dict, golden arrays)`` of ``models/tiny-<family>``."""
    folder = MODELS / f"tiny-{family}"
    module, variables, _ = load_model(str(folder), jnp.float32)
    with np.load(folder / "golden.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return module, variables, load_config(folder), arrays


@lru_cache(maxsize=None)
def apply(family: str):
    module, variables, _, _ = golden(family)
    return jax.jit(lambda *args: module.apply(variables, *args).logits)


def solo_rows(g) -> list[list[int]]:
    """The padded batch's rows without their padding."""
    return [list(map(int, ids[mask.astype(bool)])) for ids, mask in zip(g["padded_ids"], g["padded_mask"])]


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_is_small_and_complete(family):
    folder = MODELS / f"tiny-{family}"
    names = {f.name for f in folder.iterdir()}
    assert {"config.json", "model.safetensors", "golden.npz", "golden.json"} <= names
    assert sum(f.stat().st_size for f in folder.iterdir()) < MAX_FOLDER_BYTES
    meta = json.loads((folder / "golden.json").read_text())
    assert meta["family"] == family and {"transformers", "torch"} <= set(meta["versions"])
    _, _, config, g = golden(family)
    assert set(g) == GOLDEN_KEYS
    assert config["model_type"] == family and config.get("num_hidden_layers", config.get("n_layer")) == 2
    assert g["logits"].shape == (*g["ids"].shape, config["vocab_size"]) and g["logits"].dtype == np.float32
    assert np.abs(g["logits"]).max() > 1.0  # weights are not near zero
    np.testing.assert_array_equal(
        g["padded_positions"], np.clip(np.cumsum(g["padded_mask"], -1) - 1, 0, None))
    assert g["padded_mask"].min() == 0  # some row is padded


def test_goldens_cover_the_family_switches():
    """Each folder holds the config feature it is there for."""
    c = {family: golden(family)[0].config for family in FAMILIES}
    assert c["gpt2"].tie_word_embeddings
    assert c["llama"].rope_type == "llama3" and c["llama"].rope_theta == 5000.0
    assert c["llama"].attention_bias and c["llama"].mlp_bias and not c["llama"].tie_word_embeddings
    assert [c["mistral"].window_of(i) for i in range(2)] == [4, 4]
    assert [c["qwen2"].window_of(i) for i in range(2)] == [None, 4] and c["qwen2"].tie_word_embeddings
    assert c["qwen3"].qk_norm
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        assert c[family].rope_theta == 5000.0


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_golden(family):
    g = golden(family)[3]
    ours = apply(family)(jnp.asarray(g["ids"]))
    assert max_diff(ours, g["logits"]) <= TOL, (family, max_diff(ours, g["logits"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_logits_equal_golden(family):
    g = golden(family)[3]
    ids, mask, positions = (jnp.asarray(g[k]) for k in ("padded_ids", "padded_mask", "padded_positions"))
    real = g["padded_mask"].astype(bool)
    explicit = apply(family)(ids, mask, positions)
    derived = apply(family)(ids, mask)  # position ids from the mask, as LanguageModel runs it
    assert bool(jnp.all(jnp.isfinite(explicit))) and bool(jnp.all(jnp.isfinite(derived)))
    assert max_diff(np.asarray(explicit)[real], g["padded_logits"][real]) <= TOL
    assert max_diff(derived, explicit) == 0.0
    # a padded row is its prompt alone
    for row, solo in enumerate(solo_rows(g)):
        alone = apply(family)(jnp.asarray([solo]))
        assert max_diff(alone[0], g["padded_logits"][row][real[row]]) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_nnsight_trace_saves_golden_logits(family):
    module, variables, _, g = golden(family)
    model = jnnsight.NNsight(module, variables)
    with model.trace(jnp.asarray(g["ids"])):
        logits = model.lm_head.output.save()
        output = model.output.save()
    assert max_diff(logits, g["logits"]) <= TOL
    assert max_diff(output.logits, logits) == 0.0
    with model.trace(jnp.asarray(g["padded_ids"]), attention_mask=jnp.asarray(g["padded_mask"])):
        padded = model.lm_head.output.save()
    real = g["padded_mask"].astype(bool)
    assert max_diff(np.asarray(padded)[real], g["padded_logits"][real]) <= TOL


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_language_model_left_pads_token_ids_like_golden(family):
    """LanguageModel without a tokenizer: rows of token ids, left-padded by the collator."""
    module, variables, _, g = golden(family)
    lm = jnnsight.LanguageModel(module=module, variables=variables)
    rows = solo_rows(g)
    with lm.trace() as tracer:
        with tracer.invoke(rows[:2]):
            first = lm.lm_head.output.save()
        with tracer.invoke(rows[2]):
            last = lm.lm_head.output.save()
    real = g["padded_mask"].astype(bool)
    batched = np.concatenate([np.asarray(first), np.asarray(last)])
    assert batched.shape == g["padded_logits"].shape
    assert max_diff(batched[real], g["padded_logits"][real]) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_installed_transformers_still_gives_the_goldens(family):
    """Where torch is installed: the stored checkpoint, rerun in PyTorch, gives the stored logits.

    torch against its own earlier run differs by up to about 1.1e-4 in some processes
    of this suite (0 in others: its CPU kernels' summation order is not fixed), so
    comparisons with this live run allow TOL relative to the largest logit (about 7).
    jnnsight against the stored logits keeps the absolute TOL (test_logits_equal_golden).
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    g = golden(family)[3]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        MODELS / f"tiny-{family}", attn_implementation="eager", dtype=torch.float32).eval()

    def run(*names):
        with torch.no_grad():
            args = [torch.as_tensor(g[name].astype(np.int64)) for name in names]
            kwargs = dict(zip(("attention_mask", "position_ids"), args[1:]))
            return model(args[0], **kwargs).logits.numpy()

    rerun = TOL * float(np.abs(g["logits"]).max())
    assert max_diff(run("ids"), g["logits"]) <= rerun
    real = g["padded_mask"].astype(bool)
    theirs = run("padded_ids", "padded_mask", "padded_positions")
    assert max_diff(theirs[real], g["padded_logits"][real]) <= rerun
    assert max_diff(apply(family)(jnp.asarray(g["ids"])), run("ids")) <= rerun


@pytest.mark.filterwarnings("ignore:No tokenizer files")
@pytest.mark.parametrize("family", FAMILIES)
def test_print_shows_the_class_names_of_the_checkpoints_family(family):
    """``print(lm)`` names the model, its body, a decoder layer, its attention and MLP
    as transformers does for this checkpoint (a Qwen3 layer is ``Qwen3DecoderLayer``)."""
    lm = jnnsight.LanguageModel(MODELS / f"tiny-{family}")
    _, _, config, _ = golden(family)
    body, layer, attention = (("transformer", "h", "attn") if family == "gpt2"
                              else ("model", "layers", "self_attn"))
    paths = ["", body, f"{body}.{layer}.0", f"{body}.{layer}.0.{attention}", f"{body}.{layer}.0.mlp"]

    def shown(path: str) -> str:
        envoy = lm
        for part in filter(None, path.split(".")):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return repr(envoy).split("(", 1)[0]

    assert shown("") == config["architectures"][0]
    with lm.trace([[1, 2, 3]]):  # a trace's discovery keeps the names
        pass
    assert shown("") == config["architectures"][0]
    pytest.importorskip("torch")  # transformers builds its PyTorch classes with torch only
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(MODELS / f"tiny-{family}"))
    assert [shown(p) for p in paths] == [type(theirs.get_submodule(p)).__name__ for p in paths]
