"""The checkout's layout: its root kernels/ (installed as fastarch.kernels) must not hide another
top-level ``kernels`` (Hugging Face's, which transformers imports) when Python runs from the root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    # -c puts the working directory first on sys.path, as python -m does
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_root_kernels_steps_aside_for_an_installed_kernels(tmp_path):
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("CUDAProperties = 'theirs'\n")
    (other / "utils.py").write_text("X = 1\n")
    out = _run_from_root("import kernels, kernels.utils\nprint(kernels.CUDAProperties, kernels.utils.X)",
                         pythonpath=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["theirs", "1"]


def test_root_kernels_is_no_module_when_none_is_installed():
    out = _run_from_root(
        "import sys\n"
        "sys.path = [p for p in sys.path if 'packages' not in p]\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError as e:\n"
        "    print(e.name, 'kernels' in sys.modules)\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["kernels", "False"]
