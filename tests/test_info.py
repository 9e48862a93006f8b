"""`fastarch info` / `python -m fastarch info` / fastarch.info()."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fastarch
from fastarch import system_info as info


def test_report_lists_every_op_and_backend():
    text = info.report()
    assert f"fastarch {fastarch.__version__}" in text
    for op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
        for backend in ("cuda", "cpu", "triton", "reference"):
            assert any(line.startswith(f"{op:<16} {backend:<10} ") for line in text.splitlines()), (op, backend)
    assert "extension fastarch._C: loaded" in text


def test_module_and_console_script():
    out = subprocess.run([sys.executable, "-m", "fastarch", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "layer_norm       reference  available" in out.stdout
    script = Path(sys.executable).parent / "fastarch"
    assert script.exists(), "the fastarch console script is not installed next to this python"
    out2 = subprocess.run([str(script), "info"], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out2.returncode == 0, out2.stderr
    assert out2.stdout.splitlines()[0] == out.stdout.splitlines()[0]
