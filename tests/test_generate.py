"""Generation with interventions, against transformers' PyTorch ``generate`` and forward
hooks on the same random weights (N(0, 0.5), so cache, position and mask bugs show)."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jnnsight.generation as generation
from conftest import tiny_language_model
from jnnsight.errors import CausalityError, JnnsightError, SiteError, WriteError
from jnnsight.modeling.gpt2 import GPT2LMHeadModel
from jnnsight.tracing.lru import LruCache

torch = pytest.importorskip("torch")

NEW = 6
CASES = ("gpt2", "llama", "mistral_window", "qwen3")
PROMPTS = [[11, 12, 13, 14, 15, 16, 17], [21, 22, 23, 24]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    return {name: tiny_language_model(name, root / name) for name in CASES}


def hf_greedy(tm, prompt: list[int], hooks=(), new: int = NEW, **kwargs) -> list[int]:
    handles = [m.register_forward_hook(h) for m, h in hooks]
    try:
        with torch.no_grad():
            out = tm.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out[0].tolist()


def layer(tm, i: int):
    return tm.transformer.h[i] if hasattr(tm, "transformer") else tm.model.layers[i]


def ours_layer(lm, i: int):
    return lm.transformer.h[i] if isinstance(lm.module, GPT2LMHeadModel) else lm.model.layers[i]


def hidden_of(out):
    return out[0] if isinstance(out, tuple) else out


def with_hidden(out, hidden):
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def rows_of(tokens, prompts=PROMPTS) -> list[list[int]]:
    """Each row's prompt and new tokens, its left padding removed."""
    width = max(map(len, prompts))
    return [list(np.asarray(row)[width - len(p):]) for row, p in zip(tokens, prompts)]


# -- greedy decoding -----------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_equal_transformers_generate(models, name):
    tm, lm = models[name]
    with lm.generate(max_new_tokens=NEW, eos_token_id=None) as tracer:
        for prompt in PROMPTS:  # two invokes of different lengths: left padding
            with tracer.invoke(prompt):
                pass
        with tracer.invoke():
            tokens = tracer.result.save()
    assert tokens.shape == (2, max(map(len, PROMPTS)) + NEW)
    for ours, prompt in zip(rows_of(tokens), PROMPTS):
        assert ours == hf_greedy(tm, prompt)


@pytest.mark.parametrize("name, form", [("gpt2", "for"), ("gpt2", "bare iter"), ("llama", "with")])
def test_steering_every_step_equals_a_torch_hook(models, name, form):
    """``tracer.all()``, ``tracer.iter[:]`` and ``tracer.iter`` itself address every step."""
    tm, lm = models[name]
    width = lm.module.config.n_embd if name == "gpt2" else lm.module.config.hidden_size
    steer = jnp.asarray(np.random.default_rng(0).normal(0, 2.0, width), jnp.float32)
    with lm.generate(PROMPTS[0], max_new_tokens=NEW, eos_token_id=None) as tracer:
        if form == "with":
            with tracer.all():
                ours_layer(lm, 0).output[0] = ours_layer(lm, 0).output[0] + steer
        elif form == "for":
            for step in tracer.iter[:]:  # unbounded: the code after it runs too
                ours_layer(lm, 0).output[0] = ours_layer(lm, 0).output[0] + steer
        else:
            for step in tracer.iter:
                ours_layer(lm, 0).output[0] = ours_layer(lm, 0).output[0] + steer
        tokens = tracer.result.save()

    def add(module, args, out):
        return with_hidden(out, hidden_of(out) + torch.tensor(np.asarray(steer)))

    theirs = hf_greedy(tm, PROMPTS[0], hooks=[(layer(tm, 0), add)])
    assert list(np.asarray(tokens[0])) == theirs
    assert theirs != hf_greedy(tm, PROMPTS[0])  # the steering changed the tokens


def test_skipping_a_module_at_every_step_equals_a_torch_hook(models):
    """A skip in a generate block: each step's site table numbers the skipped calls."""
    tm, lm = models["llama"]
    with lm.generate(PROMPTS[0], max_new_tokens=NEW, eos_token_id=None) as tracer:
        with tracer.all():
            lm.model.layers[0].mlp.skip(lm.model.layers[0].mlp.input)
        tokens = tracer.result.save()

    def identity(module, args, out):
        return args[0]

    theirs = hf_greedy(tm, PROMPTS[0], hooks=[(tm.model.layers[0].mlp, identity)])
    assert list(np.asarray(tokens[0])) == theirs
    assert theirs != hf_greedy(tm, PROMPTS[0])  # the skip changed the tokens


def test_a_field_of_the_models_output_is_written_as_in_nnsight(models):
    """``lm.output.logits = v`` changes the tokens as a torch hook on the logits does, and
    ``lm.output["logits"] = v`` writes the same field."""
    tm, lm = models["llama"]
    with lm.generate(PROMPTS[0], max_new_tokens=NEW, eos_token_id=None) as tracer:
        with tracer.all():
            lm.output.logits = lm.output.logits.at[..., 7].add(8.0)
        tokens = tracer.result.save()

    def favour_7(module, args, out):
        out = out.clone()
        out[..., 7] += 8.0
        return out

    theirs = hf_greedy(tm, PROMPTS[0], hooks=[(tm.lm_head, favour_7)])
    assert list(np.asarray(tokens[0])) == theirs
    assert theirs != hf_greedy(tm, PROMPTS[0])  # the edit changed the tokens
    with lm.trace(PROMPTS[1]):
        out = lm.output
        out["logits"] = out["logits"] * 2
        doubled = lm.output.logits.save()
    with torch.no_grad():
        plain = tm(torch.tensor([PROMPTS[1]])).logits.numpy()
    np.testing.assert_allclose(doubled, 2 * plain, atol=2e-4)


def test_per_step_reads_equal_the_hidden_states_of_the_generated_sequence(models):
    tm, lm = models["llama"]
    prompt = PROMPTS[0]
    with lm.generate(prompt, max_new_tokens=NEW, eos_token_id=None) as tracer:
        first = lm.model.layers[0].output[0].save()                 # step 0
        second = lm.model.layers[0].next().output[0].save()         # step 1
        steps = []
        for step in tracer.iter[2:5]:
            steps.append(lm.model.layers[0].output[0].save())       # steps 2, 3, 4
        logits = [lm.lm_head.next(k).output.save() for k in (0, 1)]  # steps 0 and 1
        tokens = tracer.result.save()
    with torch.no_grad():
        out = tm(torch.tensor(np.asarray(tokens)), output_hidden_states=True)
    reference = out.hidden_states[1].numpy()  # layer 0's output, every position
    t = len(prompt)
    assert first.shape == (1, t, 64) and second.shape == (1, 1, 64)
    np.testing.assert_allclose(first, reference[:, :t], atol=1e-4)
    np.testing.assert_allclose(second, reference[:, t : t + 1], atol=1e-4)
    for s, h in zip(range(2, 5), steps):
        np.testing.assert_allclose(h, reference[:, t + s - 1 : t + s], atol=1e-4)
    np.testing.assert_allclose(logits[0][:, -1], out.logits[:, t - 1].numpy(), atol=1e-4)
    np.testing.assert_allclose(logits[1][:, 0], out.logits[:, t].numpy(), atol=1e-4)


def test_stop_ends_generation_after_the_last_step_the_block_needs(models, monkeypatch):
    tm, lm = models["llama"]
    with lm.generate(PROMPTS[0], max_new_tokens=NEW, eos_token_id=None) as tracer:
        whole = lm.model.layers[0].next(2).output[0].save()
        tokens = tracer.result.save()

    ran = []
    original = generation._step_function

    def counted(*args, **kwargs):
        fn = original(*args, **kwargs)
        return lambda *a: ran.append(1) or fn(*a)

    monkeypatch.setattr(generation, "_step_function", counted)
    cached = lm._generation_programs
    object.__setattr__(lm, "_generation_programs", LruCache(256))  # compile, and count, anew
    try:
        with lm.generate(PROMPTS[0], max_new_tokens=NEW, eos_token_id=None) as tracer:
            early = lm.model.layers[0].next(2).output[0].save()      # step 2
            tracer.stop()
            lm.model.layers[0].next(5).output.save()                 # not run: after stop
    finally:
        object.__setattr__(lm, "_generation_programs", cached)
    assert len(ran) == 3                                             # steps 0, 1 and 2 of 6
    np.testing.assert_allclose(early, whole, atol=1e-6)
    with torch.no_grad():
        reference = tm(torch.tensor(np.asarray(tokens)), output_hidden_states=True).hidden_states[1]
    t = len(PROMPTS[0])
    np.testing.assert_allclose(early, reference[:, t + 1 : t + 2].numpy(), atol=1e-4)
    with pytest.warns(UserWarning, match="every step runs"):
        with lm.generate(PROMPTS[0], max_new_tokens=NEW, eos_token_id=None) as tracer:
            again = tracer.result.save()
            tracer.stop()
    np.testing.assert_array_equal(again, tokens)


def test_a_value_saved_at_step_0_is_written_at_step_3_as_a_torch_hook_does(models):
    tm, lm = models["llama"]
    with lm.generate(PROMPTS[0], max_new_tokens=NEW, eos_token_id=None) as tracer:
        h = lm.model.layers[1].output[0][:, -1:]                     # step 0, last position
        for step in tracer.iter[3]:
            lm.model.layers[1].output[0] = h * 2.0
        tokens = tracer.result.save()

    calls = {"n": 0}

    def hook(module, args, out):
        n = calls["n"]
        calls["n"] += 1
        hidden = hidden_of(out)
        if n == 0:
            calls["h"] = hidden[:, -1:].clone()
        if n == 3:
            return with_hidden(out, calls["h"] * 2.0)
        return out

    theirs = hf_greedy(tm, PROMPTS[0], hooks=[(layer(tm, 1), hook)])
    assert list(np.asarray(tokens[0])) == theirs
    assert theirs != hf_greedy(tm, PROMPTS[0])


def test_cross_prompt_embeddings_drive_the_other_invokes_generation(models):
    _, lm = models["llama"]
    a, b = [31, 32, 33, 34, 35], [41, 42, 43, 44, 45]
    with lm.generate(max_new_tokens=4, eos_token_id=None) as tracer:
        with tracer.invoke(a):
            embeddings = lm.model.embed_tokens.output
        with tracer.invoke(b):
            lm.model.embed_tokens.output = embeddings
        with tracer.invoke():
            tokens = tracer.result.save()
    with lm.generate(b, max_new_tokens=4, eos_token_id=None) as tracer:
        plain_b = tracer.result.save()
    tokens = np.asarray(tokens)
    # Row b saw a's embeddings at step 0 and its own sampled tokens after: a's continuation.
    assert list(tokens[1, 5:]) == list(tokens[0, 5:])
    assert list(tokens[1, 5:]) != list(np.asarray(plain_b)[0, 5:])


# -- sampling, eos -------------------------------------------------------------------------


def test_sampling_is_reproducible_per_key_and_rows_are_independent(models):
    _, lm = models["gpt2"]

    def sample(seed: int, **kwargs):
        with lm.generate([PROMPTS[1]] * 4, max_new_tokens=NEW, do_sample=True, seed=seed,
                         eos_token_id=None, **kwargs) as tracer:
            tokens = tracer.result.save()
        return np.asarray(tokens)[:, len(PROMPTS[1]):]

    a, b, c = sample(1, temperature=3.0), sample(1, temperature=3.0), sample(2, temperature=3.0)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert len({tuple(r) for r in a}) > 1  # the same prompt in 4 rows: different samples
    greedy = sample(3, top_k=1)  # one candidate: sampling is greedy
    assert all(list(row) == hf_greedy(models["gpt2"][0], PROMPTS[1])[len(PROMPTS[1]):] for row in greedy)
    nucleus = sample(4, top_p=1e-6)  # the smallest nucleus is the top token
    np.testing.assert_array_equal(nucleus, greedy)
    assert (sample(2**32 + 1, temperature=3.0) != sample(1, temperature=3.0)).any()  # 64-bit seeds

    # As transformers: a fresh sample per call without a seed, and top_k=50 by default.
    def first_tokens(**kwargs):
        with lm.generate([PROMPTS[1]] * 64, max_new_tokens=1, do_sample=True, temperature=100.0,
                         eos_token_id=None, **kwargs) as tracer:
            tokens = tracer.result.save()
        return set(np.asarray(tokens)[:, -1].tolist())

    with lm.trace(PROMPTS[1]):
        logits = lm.lm_head.output[0, -1].save()
    top50 = set(np.argsort(-np.asarray(logits))[:50].tolist())
    assert first_tokens(seed=5) <= top50 and not first_tokens(seed=5, top_k=None) <= top50
    assert first_tokens() != first_tokens()


def test_eos_ends_rows_and_generation_as_transformers_does(models):
    tm, lm = models["llama"]
    plain = hf_greedy(tm, PROMPTS[0])
    eos = plain[len(PROMPTS[0]) + 2]  # the third new token
    with pytest.warns(UserWarning, match="generation ended after step") as caught:
        with lm.generate(PROMPTS[0], max_new_tokens=NEW, eos_token_id=eos, pad_token_id=7) as tracer:
            tokens = tracer.result.save()
            cache = tracer.cache(modules=[lm.lm_head])              # one entry per step run
            late = lm.model.layers[0].next(5).output[0].save()      # step 5: never reached
            with tracer.all():
                last = lm.model.layers[1].output[0].save()          # the last step that ran
            each = []
            for step in tracer.iter[:]:
                each.append(lm.model.layers[1].output[0].save())
                normed = lm.model.norm.output.save(gather=True)     # numpy, of the last step run
                normed_each = lm.model.norm.output.save()
                pair = (lm.model.norm.output.save(), lm.lm_head.output.save())  # a new tuple
                odd = lm.model.layers[0].output[0] if step % 2 else lm.lm_head.output
                alternating = odd.save()                            # one name, two lines
    assert caught[0].filename == __file__  # the warning names the user's block
    theirs = hf_greedy(tm, PROMPTS[0], eos_token_id=eos, pad_token_id=7)
    ours = list(np.asarray(tokens[0]))
    assert ours[: len(theirs)] == theirs and len(theirs) < len(ours)
    assert set(ours[len(theirs):]) == {7}
    for use in (lambda: late.shape, lambda: np.asarray(late), lambda: late + 1,
                lambda: jnp.asarray(late), lambda: late[0], lambda: float(late),
                lambda: each[3] + 1):
        with pytest.raises(JnnsightError, match="never ran"):
            use()
    # As in nnsight, a name the step loop binds holds the last step that ran (step 2,
    # which produced eos); a list it appends to has that step's value at index 2.
    np.testing.assert_array_equal(last, each[2])
    assert not np.array_equal(each[1], each[2])
    assert isinstance(normed, np.ndarray) and normed.shape == normed_each.shape == (1, 1, 64)
    np.testing.assert_array_equal(normed, normed_each)
    # what the names held after step 2, the last that ran: a tuple built anew, and a name
    # bound by different lines at odd and even steps
    np.testing.assert_array_equal(pair[0], normed_each)
    np.testing.assert_array_equal(alternating, pair[1])
    assert pair[1].shape[-1] == tm.config.vocab_size
    assert len(cache.lm_head) == 3  # steps 0, 1 and 2 ran
    np.testing.assert_array_equal(cache["model.lm_head"].output[2], pair[1])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_repetition_penalty_and_min_new_tokens_equal_transformers_generate(models, name):
    tm, lm = models[name]
    changed = False
    for prompt in PROMPTS:
        with lm.generate(prompt, max_new_tokens=NEW, eos_token_id=None, repetition_penalty=1.8) as tracer:
            tokens = tracer.result.save()
        theirs = hf_greedy(tm, prompt, repetition_penalty=1.8)
        assert list(np.asarray(tokens[0])) == theirs
        changed |= theirs != hf_greedy(tm, prompt)
    assert changed  # the penalty mattered for these prompts

    # One left-padded batch, padded with the short row's first greedy token: transformers
    # does not count a row's left padding as a repetition, and neither may we.
    width = max(map(len, PROMPTS))
    pad = hf_greedy(tm, PROMPTS[1])[len(PROMPTS[1])]
    ids = np.array([[pad] * (width - len(p)) + p for p in PROMPTS])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with lm.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=NEW,
                     eos_token_id=None, pad_token_id=pad, repetition_penalty=1.8) as tracer:
        tokens = tracer.result.save()
    with torch.no_grad():
        theirs = tm.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW,
                             do_sample=False, pad_token_id=pad, repetition_penalty=1.8)
    np.testing.assert_array_equal(np.asarray(tokens), theirs.numpy())

    prompt = PROMPTS[0]
    eos = hf_greedy(tm, prompt)[len(prompt)]  # the first new token: eos without the minimum
    with lm.generate(prompt, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=7,
                     min_new_tokens=3) as tracer:
        tokens = tracer.result.save()
    theirs = hf_greedy(tm, prompt, eos_token_id=eos, pad_token_id=7, min_new_tokens=3)
    ours = list(np.asarray(tokens[0]))
    assert ours[: len(theirs)] == theirs and eos not in theirs[len(prompt): len(prompt) + 3]


def test_a_list_of_eos_tokens_ends_rows_at_any_of_them_as_transformers_does(models):
    tm, lm = models["gpt2"]
    plain = hf_greedy(tm, PROMPTS[0])
    new = plain[len(PROMPTS[0]):]
    unused = next(t for t in range(100) if t not in plain)  # an eos id that never comes
    eos = [unused, new[2], new[4]]                          # the third new token ends the row
    with lm.generate(PROMPTS[0], max_new_tokens=NEW, eos_token_id=eos, pad_token_id=7,
                     min_new_tokens=1) as tracer:
        tokens = tracer.result.save()
    theirs = hf_greedy(tm, PROMPTS[0], eos_token_id=eos, pad_token_id=7, min_new_tokens=1)
    ours = list(np.asarray(tokens[0]))
    assert len(theirs) == len(PROMPTS[0]) + 3 and ours[: len(theirs)] == theirs
    assert set(ours[len(theirs):]) == {7}


@pytest.mark.parametrize("source", ["generation_config", "config_only", "generation_config_without_eos"])
def test_default_end_and_pad_tokens_are_what_transformers_generate_uses(models, tmp_path, source):
    """transformers takes them from generation_config.json, or from config.json where the
    folder has none (a file without eos_token_id means no end token, whatever config.json
    says); the pad token falls back to the first end token."""
    transformers = pytest.importorskip("transformers")
    tm, lm = models["llama"]
    new = hf_greedy(tm, PROMPTS[0])[len(PROMPTS[0]):]
    unused = next(t for t in range(100) if t not in new)
    tm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["eos_token_id"] = new[1]  # the second new token ends the row, where it counts
    (tmp_path / "config.json").write_text(json.dumps(config))
    generation = tmp_path / "generation_config.json"
    if source == "generation_config":
        generation.write_text(json.dumps({"eos_token_id": [unused, new[1]], "pad_token_id": 9}))
    elif source == "config_only":
        generation.unlink()
    else:
        generation.write_text(json.dumps({"bos_token_id": 1}))
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).generate(
            torch.tensor([PROMPTS[0]]), attention_mask=torch.ones(1, len(PROMPTS[0]), dtype=torch.long),
            max_new_tokens=NEW, do_sample=False)[0].tolist()
    with pytest.warns(UserWarning, match="No tokenizer files"):
        configured = type(lm)(tmp_path)
    with configured.generate(PROMPTS[0], max_new_tokens=NEW) as tracer:
        tokens = tracer.result.save()
    ours = list(np.asarray(tokens[0]))
    assert ours[: len(theirs)] == theirs
    if len(theirs) < len(ours):  # transformers stops when every row ended; the rest is padding
        assert set(ours[len(theirs):]) == {9 if source == "generation_config" else new[1]}
    assert (len(theirs) == len(ours)) == (source == "generation_config_without_eos")

    if source == "generation_config_without_eos":  # the defaults can be set by hand too
        configured.generation_config = {"eos_token_id": new[1], "pad_token_id": 9}
        with configured.generate(PROMPTS[0], max_new_tokens=NEW) as tracer:
            tokens = tracer.result.save()
        np.testing.assert_array_equal(tokens[0, len(PROMPTS[0]) + 2:], 9)
        with pytest.raises(TypeError, match="takes a dict"):
            configured.generation_config = [new[1]]


def test_the_generated_tokens_compare_with_values_computed_before_any_step(models):
    _, lm = models["gpt2"]
    target = np.arange(len(PROMPTS[1]) + 3)
    with lm.generate(PROMPTS[1], max_new_tokens=3, eos_token_id=None) as tracer:
        tokens = tracer.result.save()
        same = (tracer.result == jnp.asarray(target) * 2).save()
    np.testing.assert_array_equal(same, np.asarray(tokens) == target * 2)


def test_generate_inside_jax_jit_gives_the_tokens_of_a_plain_call(models):
    _, lm = models["gpt2"]
    steer = jnp.linspace(-1.0, 1.0, 32)
    ids = jnp.asarray([PROMPTS[1]], jnp.int32)

    def run(ids, vec, eos=None):
        with lm.generate(ids, max_new_tokens=4, eos_token_id=eos, pad_token_id=0) as tracer:
            with tracer.all():
                lm.transformer.h[0].output[0] = lm.transformer.h[0].output[0] + vec
            tokens = tracer.result.save()
        return tokens

    plain = run(ids, steer)
    np.testing.assert_array_equal(jax.jit(run)(ids, steer), plain)
    eos = int(plain[0, len(PROMPTS[1]) + 1])  # the second new token ends the row
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an every-step edit of steps that did not run: no word
        stopped = run(ids, steer, eos)
    np.testing.assert_array_equal(jax.jit(run, static_argnums=2)(ids, steer, eos), stopped)
    assert list(np.asarray(stopped[0, len(PROMPTS[1]) + 2:])) == [0, 0]


def test_gradients_through_a_generation_equal_those_of_the_generated_sequence(models):
    """jax.grad of a later step's logit, with and without jax.jit (eager grad crashed once).

    The reference is the trace of the prompt plus the tokens generated before that
    step, steered at every position: what the steered key/value cache holds.
    """
    _, lm = models["gpt2"]
    ids = jnp.asarray([PROMPTS[1]], jnp.int32)
    n = len(PROMPTS[1])

    def generated_logit(vec):
        with lm.generate(ids, max_new_tokens=4, eos_token_id=None, pad_token_id=0) as tracer:
            with tracer.all():
                lm.transformer.h[0].output[0] = lm.transformer.h[0].output[0] + vec
            logits = lm.lm_head.next(3).output.save()
            tokens = tracer.result.save()
        return logits[0, -1, 7], tokens

    steer = jnp.linspace(-1.0, 1.0, 32)
    _, tokens = generated_logit(steer)

    def sequence_logit(vec):
        with lm.trace(tokens[:, :n + 3]):
            lm.transformer.h[0].output[0] = lm.transformer.h[0].output[0] + vec
            logits = lm.lm_head.output.save()
        return logits[0, -1, 7]

    expected = jax.grad(sequence_logit)(steer)
    assert float(jnp.abs(expected).max()) > 1e-3
    eager = jax.grad(lambda v: generated_logit(v)[0])(steer)
    jitted = jax.jit(jax.grad(lambda v: generated_logit(v)[0]))(steer)
    np.testing.assert_allclose(eager, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jitted, expected, rtol=1e-4, atol=1e-5)


# -- programs --------------------------------------------------------------------------------


def test_steps_with_the_same_edits_share_one_program_and_repeats_compile_nothing(models, compile_counter):
    _, lm = models["qwen3"]

    def run(steer):
        with lm.generate(PROMPTS[0], max_new_tokens=8, eos_token_id=None) as tracer:
            with tracer.all():
                lm.model.layers[1].mlp.output = lm.model.layers[1].mlp.output * 0.5 + steer
            tokens = tracer.result.save()
        return tokens

    before = {k for k in lm._generation_programs._entries if k[0] == "step"}
    run(jnp.zeros(64))
    new = {k for k in lm._generation_programs._entries if k[0] == "step"} - before
    assert len(new) == 2  # the prompt pass and one decode step for all 7 later steps
    compile_counter.clear()
    run(jnp.ones(64))  # a new outside array of the same shape
    assert compile_counter == []


# -- bad input -------------------------------------------------------------------------------


def test_bad_generation_inputs_get_clear_errors(models):
    _, lm = models["llama"]
    with pytest.raises(SiteError, match="can be read and saved, not written"):
        with lm.generate(PROMPTS[0], max_new_tokens=2) as tracer:
            tracer.result = 0  # noqa: F841  (a plain attribute: refused below instead)
    with pytest.raises(SiteError, match="not written"):
        with lm.generate(PROMPTS[0], max_new_tokens=2):
            lm.generator.output = jnp.zeros((1, 9), jnp.int32)
    with pytest.raises(SiteError, match="exist in `lm.generate"):
        with lm.trace(PROMPTS[0]):
            lm.generator.output.save()
    with pytest.raises(IndexError, match="has 3 step"):
        with lm.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            for step in tracer.iter[3]:
                pass
    with pytest.raises(SiteError, match="Raise max_new_tokens"):
        with lm.generate(PROMPTS[0], max_new_tokens=2):
            lm.model.layers[0].next(2).output.save()
    with pytest.raises(SiteError, match=r"that call is at step 3 \(`.next\(\)` counts on from the "
                       r"step a `tracer.iter` loop or `tracer.all\(\)` body addresses\)"):
        with lm.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            with tracer.all():
                lm.model.layers[0].next().output.save()
    with pytest.raises(SiteError, match=r"^[^\n]*\nmodel\.generator\.output is read in the body "
                       r"of a `lm.generate\(max_new_tokens=...\)` with no input"):
        with lm.generate(max_new_tokens=2) as tracer:
            with tracer.invoke(PROMPTS[0]):
                pass
            tracer.result.save()      # outside the invokes
    with pytest.raises(CausalityError, match=r"depends on `model.generator.output`"):
        with lm.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            for step in tracer.iter[1]:
                lm.lm_head.output = lm.lm_head.output * tracer.result[0, -1]
    with pytest.raises(CausalityError, match=r"step 2's and the write is at step 0: a name bound "
                       r"in a `tracer.all\(\)`.*holds the last step's value"):
        with lm.generate(max_new_tokens=3) as tracer:
            with tracer.invoke(PROMPTS[0]):
                with tracer.all():
                    source = lm.model.layers[1].output[0][:, -1]
            with tracer.invoke(PROMPTS[0]):
                with tracer.all():
                    lm.model.layers[1].output[0] = lm.model.layers[1].output[0].at[:, -1].set(source)
    with pytest.raises(WriteError, match=r"in generation a decoder layer returns `\(hidden, "
                       r"\(keys, values\)\)`"):
        with lm.generate(PROMPTS[0], max_new_tokens=2):
            lm.model.layers[1].skip((lm.model.layers[1].input,))
    with pytest.raises(ValueError, match=r"test_generate.py:\d+:[\s\S]*max_new_tokens"):
        lm.generate(PROMPTS[0], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"test_generate.py:\d+:[\s\S]*top_p"):
        lm.generate(PROMPTS[0], do_sample=True, top_p=1.5)
    with pytest.raises(TypeError, match=r"test_generate.py:\d+:[\s\S]*or pass seed=3"):
        lm.generate(PROMPTS[0], key=3)
    with pytest.raises(TypeError, match=r"test_generate.py:\d+:[\s\S]*seed= or key=, not both"):
        lm.generate(PROMPTS[0], do_sample=True, seed=1, key=jax.random.key(2))
    with pytest.raises(TypeError, match=r"test_generate.py:\d+:[\s\S]*do_sample must be True or False"):
        lm.generate(PROMPTS[0], do_sample="False")
    with pytest.raises(TypeError, match=r"test_generate.py:\d+:[\s\S]*a block, not a loop"):
        with lm.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            for step in tracer.all():
                pass
    with pytest.raises(JnnsightError, match=r"test_generate.py:\d+:[\s\S]*`max_new_tokens=` belongs "
                       r"to `lm.generate\(...\)`"):
        lm.trace(PROMPTS[0], max_new_tokens=3)  # refused where it is written, entered or not
    with pytest.raises(JnnsightError, match=r"`trace=` is an nnsight or transformers option"):
        lm.trace(PROMPTS[0], trace=False)
    for bad, error, match in ((dict(top_k=1.5), ValueError, "top_k must be an int"),
                              (dict(temperature="hot"), ValueError, "must be Python numbers"),
                              (dict(top_p=jnp.float32(0.5)), ValueError, "must be Python numbers"),
                              (dict(seed="a"), TypeError, "seed must be an int"),
                              (dict(seed=-1), TypeError, "seed must be an int")):
        with pytest.raises(error, match=rf"test_generate.py:\d+:[\s\S]*{match}"):
            lm.generate(PROMPTS[0], do_sample=True, **bad)
    lm.generate(PROMPTS[0], do_sample=True, temperature=np.float32(0.5))  # numpy scalars are numbers
    lm.generate(PROMPTS[0], max_new_tokens=np.int64(2))  # numpy ints are ints
    with pytest.warns(UserWarning, match="top_k=5, temperature=0.5 only apply when sampling|"
                                         "temperature=0.5, top_k=5 only apply when sampling"):
        lm.generate(PROMPTS[0], temperature=0.5, top_k=5)
    for selection in (1.0, jnp.array([1, 2])):
        with pytest.raises(TypeError, match="tracer.iter takes a step number"):
            with lm.generate(PROMPTS[0], max_new_tokens=3) as tracer:
                for step in tracer.iter[selection]:
                    pass
    with pytest.warns(UserWarning, match=r"tracer.iter\[5:8:None\] selects no step"):
        with lm.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            for step in tracer.iter[5:8]:
                lm.model.layers[0].output.save()
    with pytest.warns(UserWarning, match=r"tracer.iter\[1:10:None\] reaches past .* 3 steps .* steps 1 to 2 only"):
        with lm.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            seen = []
            for step in tracer.iter[1:10]:
                seen.append(lm.model.layers[0].output[0].save())
    assert len(seen) == 2
    with pytest.raises(TypeError, match=r"test_generate.py:\d+:[\s\S]*older spelling.*for step in tracer.iter"):
        with lm.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            with tracer.iter[1:3]:
                pass
    with pytest.warns(UserWarning, match="never written to the model") as record:
        with lm.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            with tracer.all():  # one line, run for every step: one warning
                h = lm.model.layers[0].output[0]
                h = h.at[:, -1].set(0)
    assert sum("never written" in str(w.message) for w in record) == 1
    with pytest.raises(Exception, match=r"Use `lm.generate\(max_new_tokens=...\)` with no input"):
        with lm.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            with tracer.invoke(PROMPTS[1]):
                pass
    with pytest.raises(ValueError, match="a number of calls >= 0, got -1"):
        with lm.generate(PROMPTS[0], max_new_tokens=3):
            lm.model.layers[0].next(-1).output.save()
    with pytest.raises(ValueError, match="repetition_penalty"):
        lm.generate(PROMPTS[0], repetition_penalty=0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        lm.generate(PROMPTS[0], min_new_tokens=-1)
    for eos in ([2, "</s>"], [2, -1], True):
        with pytest.raises(ValueError, match="eos_token_id must be a token id"):
            lm.generate(PROMPTS[0], eos_token_id=eos)
    with pytest.raises(ValueError, match=r"test_generate.py:\d+:[\s\S]*lists no end token"):
        lm.generate(PROMPTS[0], eos_token_id=[])
    with pytest.raises(ValueError, match="pad_token_id must be a token id"):
        lm.generate(PROMPTS[0], pad_token_id=2.5)
    with pytest.raises(TypeError, match=r"test_generate.py:\d+:[\s\S]*not support 'num_beams'"):
        lm.generate(PROMPTS[0], num_beams=2)
    with pytest.warns(UserWarning, match="min_new_tokens=2 has no effect") as caught:
        lm.generate(PROMPTS[0], min_new_tokens=np.int64(2), eos_token_id=None)
    assert caught[0].filename == __file__
    with pytest.raises(JnnsightError, match="ends in padding"):
        with lm.generate({"input_ids": np.array([[11, 12, 0]]),
                          "attention_mask": np.array([[1, 1, 0]])}, max_new_tokens=2):
            pass
    with pytest.raises(Exception, match="belongs inside"):
        with lm.generate(max_new_tokens=2) as tracer:
            for step in tracer.iter[:]:
                pass
            with tracer.invoke(PROMPTS[0]):
                pass


def test_the_progress_bar_is_off_by_default_when_not_interactive_and_on_when_asked(models, capsys):
    _, lm = models["gpt2"]
    with lm.generate(PROMPTS[1], max_new_tokens=3, eos_token_id=None) as tracer:
        quiet = tracer.result.save()
    assert "generate" not in capsys.readouterr().err  # pytest's stderr is not a terminal
    with lm.generate(PROMPTS[1], max_new_tokens=3, eos_token_id=None, progress=True) as tracer:
        shown = tracer.result.save()
    assert "generate" in capsys.readouterr().err
    np.testing.assert_array_equal(quiet, shown)


def test_a_name_bound_at_every_step_gives_no_lost_save_warning(models):
    """nnsight's pattern: the name holds the last step; earlier steps' saves are not lost
    values the user forgot (an unassigned save still warns)."""
    _, lm = models["gpt2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lm.generate(PROMPTS[1], max_new_tokens=3, eos_token_id=None) as tracer:
            with tracer.all():
                h = lm.transformer.h[0].output[0].save()
            for step in tracer.iter[:]:
                last = lm.transformer.h[1].output[0].save()
    assert not [w for w in caught if "ended up in no variable" in str(w.message)]
    assert h.shape == last.shape == (1, 1, 32)
    with pytest.warns(UserWarning, match="1 saved value.*ended up in no variable"):
        with lm.generate(PROMPTS[1], max_new_tokens=3, eos_token_id=None) as tracer:
            lm.transformer.h[0].output[0].save()
            kept = tracer.result.save()
    assert kept.shape == (1, len(PROMPTS[1]) + 3)  # a save under a name is not lost
