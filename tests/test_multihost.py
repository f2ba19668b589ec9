"""Multi-host: two JAX processes on this machine as the hosts of one mesh, each checking
the shards it holds against a one-device run (tests/multihost_check.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_two_processes_load_trace_differentiate_and_generate_on_one_mesh():
    script = Path(__file__).with_name("multihost_check.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert done.stdout.count(": ok;") == 2 and "all hosts ok" in done.stdout
