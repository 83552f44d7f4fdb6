"""The worked example runs end to end (its --quick step counts), as the README tells users to."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "arithmetic.py"


def test_arithmetic_example_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = lines.index("held-out chat accuracy (100 problems, greedy, exact answer):")
    stages = [line.split()[0] for line in lines[header + 1:header + 5]]
    assert stages == ["pretrained", "after", "after", "after"]
    for run in ("base", "sft", "dpo", "rl"):
        assert (tmp_path / run / "latest").is_file()
