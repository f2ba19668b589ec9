"""Overhead of jnnsight's trace engine against the plain jitted forward.

The spec (from the issue): on CPU, a 12-block linen transformer of GPT-2-small
width at batch 1 x 32 tokens; medians over repeats of

  (a) the plain jitted forward,
  (b) a trace saving the logits,
  (c) a trace saving every block output (and the logits),
  (d) a trace with one write (saving the logits);

each time and its ratio to (a), plus the host time of a repeated trace call
(capture + abstract pass + cache lookup + dispatch). Targets: ratios <= 1.05
at steady state; host time <= 2 ms.

Usage::

    python scripts/bench_overhead.py                  # the full run
    python scripts/bench_overhead.py --quick          # tiny model, few repeats: a smoke run
    python scripts/bench_overhead.py --repeats 100 --json bench.json

Method
------
Model: ``jnnsight.toy.toy_model(layers=12, width=768, heads=12, vocab=50257,
length=32)``, GPT-2 small's shape with random weights. JAX runs on CPU
(``JAX_PLATFORMS`` defaults to ``cpu`` here; set it to override).

The variants, one function call each:

(a) ``jax.jit(model.module.apply)(model.variables, tokens)``.
(b) ``logits = model.output.save()`` -- the program is the plain forward.
(c) ``hidden = [block.output[0].save() for block in model.h]``, and the logits.
(d) ``middle.output[0] = middle.output[0] * 0.5`` on the middle block, and the logits.

Each trace saves the logits because a trace's program computes only what its
block saves (XLA drops the rest): a block saving nothing runs no forward.

What is timed: from the call until the forward's results are ready. For (a)
that is ``jax.block_until_ready`` on the logits. The script wraps, from the
outside, each compiled forward the engine creates (it replaces the
``_compile`` of the model's executor *instance*; the library is unchanged). The
wrapper passes the call through and keeps its result, ``(None, saves)``, and
the timer blocks on that: every trace variant waits for what (a) waits for,
the whole forward, plus its saves, which come out of the same executable. The
wrapper also stamps the time around the call, which splits the trace call's
host time into *before* the forward call (capture, collate, site-table lookup,
abstract pass, schedule and executor lookups), the *forward call* (argument
handling and dispatch) and *after* it (saved values put into the caller's
names). It costs well under a microsecond, and it counts compilations: a
compile during the timed repeats is reported.

Steady state: each variant runs ``--warmup`` times first (the first call
compiles). The repeats are interleaved: repeat ``r`` runs all four variants in
an order rotated by ``r``, so drift and noise hit every variant alike. The
table reports medians over repeats and the ratio of each median to (a)'s; it
adds the *paired* ratio, the median over repeats of a call's time over (a)'s
time in the same repeat, which is steadier when other processes load the
machine unevenly.

Host time: the wall time from the call to the end of the ``with`` statement,
results not awaited (dispatch is asynchronous on CPU). On a machine with few
cores this wall time depends on scheduling as much as on the engine: a jitted
call made a few milliseconds after the last forward finished (after the
trace's own Python work, or after any busy loop) wakes XLA's worker threads,
which can take the caller's core before the call returns, and the Python work
itself runs with caches the forward has just flushed. The breakdown is
therefore measured again with nothing computing, calls back to back (warm
caches: a lower bound of the engine's cost): the wrapped forward returns its
last real result instead of running ("stubbed"), and each engine step is
timed with ``time.perf_counter`` by wrapping, from the outside, the function
that implements it (``Capture.enter``, ``NNsight._collate``, ``NNsight._site_table``,
``Builder.run``, ``InterventionProgram.__post_init__`` -- the fingerprint,
``Executor.__call__``, ``resolve_namespace``, ``write_frame``); "other" is the
rest of the call. Last, ``cProfile`` runs the stubbed trace calls and lists the
costliest functions per trace call. Profiling inflates the cost of small
Python functions, so read its numbers relative to each other and take
absolute costs from the breakdown.

Output: a machine line, a markdown table (variant | median ms | ratio to
plain | paired ratio), host-time lines, the breakdown and the profile. The last line of
stdout holds every number as JSON (also written to ``--json PATH``).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import platform
import pstats
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax  # noqa: E402
import jax  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402

from jnnsight import NNsight  # noqa: E402
from jnnsight.toy import toy_model  # noqa: E402
from jnnsight.tracing import tracer as tracer_module  # noqa: E402
from jnnsight.tracing.capture import Capture  # noqa: E402
from jnnsight.tracing.execute import Executor  # noqa: E402
from jnnsight.tracing.program import Builder, InterventionProgram  # noqa: E402

RATIO_TARGET = 1.05
HOST_TARGET_MS = 2.0
REPO = Path(__file__).resolve().parents[1]

FULL = dict(layers=12, width=768, heads=12, vocab=50257, length=32)
QUICK = dict(layers=2, width=64, heads=4, vocab=256, length=8)

# The engine steps of the breakdown: (row name, owner, attribute wrapped).
STEPS: tuple[tuple[str, Any, str], ...] = (
    ("capture (Capture.enter)", Capture, "enter"),
    ("collate (NNsight._collate)", NNsight, "_collate"),
    ("site-table lookup (NNsight._site_table)", NNsight, "_site_table"),
    ("abstract pass (Builder.run, less fingerprint)", Builder, "run"),
    ("fingerprint (InterventionProgram.__post_init__)", InterventionProgram, "__post_init__"),
    ("executor lookup (Executor.__call__, forward stubbed)", Executor, "__call__"),
    ("resolve saves (resolve_namespace)", tracer_module, "resolve_namespace"),
    ("write back (write_frame)", tracer_module, "write_frame"),
)
ABSTRACT, FINGERPRINT = STEPS[3][0], STEPS[4][0]
OTHER = "other (Tracer enter/exit, namespace, parameter avals, schedule lookup)"


# -- waiting for a trace's forward ------------------------------------------------------


class ForwardProbe:
    """Wraps every compiled forward an executor creates: stamps calls, keeps results.

    With ``stub`` set, a wrapped forward returns its last real result instead of
    running, so the engine's host work can be timed with nothing computing.
    """

    def __init__(self, executor: Executor):
        self.stub = False
        self.compiles = 0
        self.entered = 0.0
        self.exited = 0.0
        self._result: Any = None
        compile_forward = executor._compile

        def compile_probed(*args: Any) -> Callable[..., Any]:
            self.compiles += 1
            return self._wrap(compile_forward(*args))

        executor._compile = compile_probed  # an instance attribute: the class is untouched

    def _wrap(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        last: list[Any] = []

        def probed(*args: Any) -> Any:
            self.entered = time.perf_counter()
            if not self.stub:
                last[:] = [forward(*args)]
            elif not last:
                raise RuntimeError("a stubbed forward was called before it ever ran")
            self.exited = time.perf_counter()
            self._result = last[0]
            return last[0]

        return probed

    def take(self) -> Any:
        """The result of the last forward call, once; an error when there was none."""
        result, self._result = self._result, None
        if result is None:
            raise RuntimeError("the trace ran no compiled forward of the engine")
        return result


# -- the variants -----------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    call: Callable[[], Any]
    traced: bool


def make_variants(model: NNsight, tokens: jax.Array) -> list[Variant]:
    forward = jax.jit(model.module.apply)
    variables = model.variables
    middle = model.h[len(model.h) // 2]

    def plain() -> jax.Array:
        return forward(variables, tokens)

    def save_logits() -> jax.Array:
        with model.trace(tokens):
            logits = model.output.save()
        return logits

    def save_blocks() -> list[jax.Array]:
        with model.trace(tokens):
            hidden = [block.output[0].save() for block in model.h]
            logits = model.output.save()
        return [*hidden, logits]

    def one_write() -> jax.Array:
        with model.trace(tokens):
            middle.output[0] = middle.output[0] * 0.5
            logits = model.output.save()
        return logits

    @jax.jit
    def jitted_write(tokens: jax.Array) -> jax.Array:
        with model.trace(tokens):
            middle.output[0] = middle.output[0] * 0.5
            logits = model.output.save()
        return logits

    def write_in_jit() -> jax.Array:
        return jitted_write(tokens)

    return [
        Variant("a", "(a) plain jitted forward", plain, traced=False),
        Variant("b", "(b) trace, saves the logits", save_logits, traced=True),
        Variant("c", "(c) trace, saves every block output", save_blocks, traced=True),
        Variant("d", "(d) trace, one write", one_write, traced=True),
        Variant("e", "(e) the write of (d), block inside jax.jit", write_in_jit, traced=False),
    ]


def check(variants: list[Variant], probe: ForwardProbe, config: dict[str, int]) -> None:
    """The variants compute what they claim: (b) the plain logits, (c) the blocks, (d) an edit."""
    plain, traced, blocks, write, in_jit = variants
    logits = np.asarray(plain.call())

    def traced_call(variant: Variant) -> Any:
        result = variant.call()
        probe.take()  # the engine ran its compiled forward
        return result

    unchanged = np.asarray(traced_call(traced))
    *hidden, _ = traced_call(blocks)
    edited = np.asarray(traced_call(write))
    assert np.allclose(unchanged, logits, rtol=1e-5, atol=1e-5), "(b) changed the logits"
    assert len(hidden) == config["layers"], "(c) did not save every block"
    assert all(h.shape == (1, config["length"], config["width"]) for h in hidden)
    assert not np.allclose(edited, logits), "(d) left the logits unchanged"
    # (e) and (d) are different XLA programs: on GPU, float32 matmuls run in TF32 by default.
    tol = 1e-5 if jax.default_backend() == "cpu" else 2e-2 * float(np.abs(edited).max())
    assert np.allclose(np.asarray(in_jit.call()), edited, rtol=0, atol=tol), "(e) differs from (d)"


# -- timing ------------------------------------------------------------------------------


def timed_call(variant: Variant, probe: ForwardProbe) -> dict[str, float]:
    """One call: total time until results are ready, host time until the call returns (ms)."""
    start = time.perf_counter()
    returned = variant.call()
    returned_at = time.perf_counter()
    jax.block_until_ready(probe.take() if variant.traced else returned)
    ready_at = time.perf_counter()
    times = {"total": ready_at - start, "host": returned_at - start}
    if variant.traced:
        times["before"] = probe.entered - start
        times["forward_call"] = probe.exited - probe.entered
        times["after"] = returned_at - probe.exited
    return {name: seconds * 1e3 for name, seconds in times.items()}


def measure(variants: list[Variant], probe: ForwardProbe, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Per variant and quantity, the times of ``repeats`` interleaved calls."""
    samples: dict[str, dict[str, list[float]]] = {v.key: {} for v in variants}
    for r in range(repeats):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            for name, value in timed_call(variant, probe).items():
                samples[variant.key].setdefault(name, []).append(value)
    return samples


@contextmanager
def _timed_attribute(owner: Any, attribute: str, name: str, spent: dict[str, float]) -> Iterator[None]:
    original = vars(owner)[attribute]
    is_classmethod = isinstance(original, classmethod)
    function = original.__func__ if is_classmethod else original

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, attribute, classmethod(timed) if is_classmethod else timed)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


@contextmanager
def stubbed(probe: ForwardProbe) -> Iterator[None]:
    probe.stub = True
    try:
        yield
    finally:
        probe.stub = False


def breakdown(variants: list[Variant], probe: ForwardProbe, calls: int) -> dict[str, dict[str, float]]:
    """Per trace variant, the median ms of each engine step, forward stubbed."""
    traced = [v for v in variants if v.traced]
    rows: dict[str, list[dict[str, float]]] = {v.key: [] for v in traced}
    spent: dict[str, float] = {}
    with stubbed(probe), ExitStack() as stack:
        for name, owner, attribute in STEPS:
            stack.enter_context(_timed_attribute(owner, attribute, name, spent))
        for _ in range(calls):
            for variant in traced:
                spent.clear()
                start = time.perf_counter()
                variant.call()
                total = time.perf_counter() - start
                probe.take()
                steps = {name: spent.get(name, 0.0) for name, _, _ in STEPS}
                steps[ABSTRACT] -= steps[FINGERPRINT]
                steps[OTHER] = total - sum(steps.values())
                steps["total"] = total
                rows[variant.key].append(steps)
    return {
        key: {name: statistics.median(call[name] for call in per_call) * 1e3 for name in per_call[0]}
        for key, per_call in rows.items()
    }


def profile(variants: list[Variant], probe: ForwardProbe, calls: int) -> pstats.Stats:
    """cProfile of ``calls`` stubbed calls of every trace variant (the host part only)."""
    profiler = cProfile.Profile()
    with stubbed(probe):
        for _ in range(calls):
            for variant in (v for v in variants if v.traced):
                profiler.enable()
                variant.call()
                profiler.disable()
                probe.take()
    return pstats.Stats(profiler)


def _where(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    if filename == "~":
        return name
    for marker in ("site-packages/", f"{REPO}/"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
    return f"{filename}:{line}({name})"


def profile_rows(stats: pstats.Stats, trace_calls: int, sort: str, count: int) -> list[dict[str, Any]]:
    """The top ``count`` functions by ``sort`` ("cum" or "self"), per trace call."""
    rows = [
        {
            "function": _where(key),
            "calls": ncalls / trace_calls,
            "self_ms": self_time / trace_calls * 1e3,
            "cum_ms": cum_time / trace_calls * 1e3,
        }
        for key, (_, ncalls, self_time, cum_time, _) in stats.stats.items()  # type: ignore[attr-defined]
    ]
    rows.sort(key=lambda row: row[f"{sort}_ms"], reverse=True)
    return rows[:count]


# -- the report --------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
    }


def summarize(variants: list[Variant], samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """Medians and quartiles per variant; its ratio to (a), of medians and paired per repeat."""
    plain = samples["a"]["total"]
    summary: dict[str, dict[str, Any]] = {}
    for v in variants:
        total = samples[v.key]["total"]
        q1, _, q3 = statistics.quantiles(total, n=4) if len(total) > 1 else (total[0],) * 3
        summary[v.key] = {
            "label": v.label,
            "median_ms": statistics.median(total),
            "p25_ms": q1,
            "p75_ms": q3,
            "ratio": statistics.median(total) / statistics.median(plain),
            "paired_ratio": statistics.median(t / p for t, p in zip(total, plain)),
            **{f"{name}_ms": statistics.median(values)
               for name, values in samples[v.key].items() if name != "total"},
        }
    return summary


def _verdict(value: float, target: float) -> str:
    return "met" if value <= target else "missed"


def print_report(report: dict[str, Any]) -> None:
    m, c = report["machine"], report["model"]
    print(f"machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, jax {m['jax']} "
          f"(jaxlib {m['jaxlib']}, {m['backend']}), flax {m['flax']}")
    print(f"model: toy GPT, {c['layers']} blocks, width {c['width']}, {c['heads']} heads, "
          f"vocab {c['vocab']}, batch 1 x {c['length']} tokens; {report['repeats']} interleaved "
          f"repeats after {report['warmup']} warm-up calls each")
    print()
    print("| variant | median ms | ratio to plain | paired ratio |")
    print("|---|---:|---:|---:|")
    variants = report["variants"]
    for v in variants.values():
        print(f"| {v['label']} | {v['median_ms']:.2f} | {v['ratio']:.3f} | {v['paired_ratio']:.3f} |")
    print("(ratio to plain: of the medians; paired ratio: median over repeats of the call's "
          "time over (a)'s in the same repeat, which cancels load that drifts between repeats)")
    print()
    print("host time per call, results not awaited (median ms):")
    print(f"  {variants['a']['label']}: {variants['a']['host_ms']:.3f} (the jitted call returning)")
    for key in "bcd":
        v = variants[key]
        print(f"  {v['label']}: {v['host_ms']:.3f} = {v['before_ms']:.3f} before the forward call "
              f"+ {v['forward_call_ms']:.3f} forward call + {v['after_ms']:.3f} after")
    steps = report["breakdown_ms"]
    print("  engine's own host work, forward stubbed (total of the breakdown below): "
          + ", ".join(f"{k} {steps[k]['total']:.3f}" for k in "bcd"))
    traced = [variants[k] for k in "bcd"]
    ratio = max(v["ratio"] for v in traced)
    host = max(v["host_ms"] for v in traced)
    engine = max(steps[k]["total"] for k in "bcd")
    print(f"targets (worst of b, c, d): ratio <= {RATIO_TARGET}: {_verdict(ratio, RATIO_TARGET)} "
          f"({ratio:.3f}); host <= {HOST_TARGET_MS} ms: {_verdict(host, HOST_TARGET_MS)} "
          f"({host:.3f} ms wall; engine's own work {engine:.3f} ms, "
          f"{_verdict(engine, HOST_TARGET_MS)})")
    if report["compiles_during_repeats"]:
        print(f"WARNING: the engine compiled {report['compiles_during_repeats']} program(s) "
              "during the timed repeats: not a steady state")
    print()
    print(f"host-time breakdown, forward stubbed, nothing computing (median ms over "
          f"{report['breakdown_calls']} calls):")
    print("| step | (b) | (c) | (d) |")
    print("|---|---:|---:|---:|")
    for name in steps["b"]:
        print(f"| {name} | " + " | ".join(f"{steps[k][name]:.3f}" for k in "bcd") + " |")
    print()
    trace_calls = report["profile_trace_calls"]
    for title, rows in (("cumulative", report["profile_cumulative"]), ("self", report["profile_self"])):
        print(f"cProfile, forward stubbed, top by {title} time (ms per trace call, "
              f"over {trace_calls} calls of (b), (c), (d)):")
        print("| cum ms | self ms | calls | function |")
        print("|---:|---:|---:|---|")
        for row in rows:
            print(f"| {row['cum_ms']:.3f} | {row['self_ms']:.3f} | {row['calls']:.1f} | {row['function']} |")
        print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 50; 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first (default 3)")
    parser.add_argument("--profile-calls", type=int, default=None, help="cProfile'd calls per trace variant (default 20; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few repeats: a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON numbers to this path")
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 50)
    profile_calls = args.profile_calls or (3 if args.quick else 20)
    config = QUICK if args.quick else FULL

    model, tokens = toy_model(**config)
    probe = ForwardProbe(model._executor)
    variants = make_variants(model, tokens)
    for variant in variants:
        for _ in range(max(args.warmup, 1)):
            timed_call(variant, probe)
    check(variants, probe, config)

    compiles = probe.compiles
    samples = measure(variants, probe, repeats)
    compiles_during_repeats = probe.compiles - compiles
    steps = breakdown(variants, probe, repeats)
    stats = profile(variants, probe, profile_calls)
    trace_calls = 3 * profile_calls

    report = {
        "machine": machine(),
        "model": config,
        "repeats": repeats,
        "warmup": max(args.warmup, 1),
        "variants": summarize(variants, samples),
        "compiles_during_repeats": compiles_during_repeats,
        "breakdown_calls": repeats,
        "breakdown_ms": steps,
        "profile_trace_calls": trace_calls,
        "profile_cumulative": profile_rows(stats, trace_calls, "cum", 25),
        "profile_self": profile_rows(stats, trace_calls, "self", 15),
        "targets": {"ratio": RATIO_TARGET, "host_ms": HOST_TARGET_MS},
    }
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
