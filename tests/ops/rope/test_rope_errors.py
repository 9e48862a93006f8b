"""Bad input to fastarch.ops.rotary and rotary_tables: a ValueError/TypeError naming the
argument, never a crash or a read outside the table."""

from __future__ import annotations

import pytest
import torch

from fastarch import ops

COS, SIN, _ = ops.rotary_tables(8, 16)


def qk(b=2, hq=2, hk=1, s=4, d=8):
    return torch.randn(b, hq, s, d), torch.randn(b, hk, s, d)


def test_shape_mismatches():
    q, k = qk()
    with pytest.raises(ValueError, match="k must be .*seqlen"):
        ops.rotary(q, torch.randn(2, 1, 5, 8), COS, SIN)
    with pytest.raises(ValueError, match="k must be .*batch"):
        ops.rotary(q, torch.randn(3, 1, 4, 8), COS, SIN)
    with pytest.raises(ValueError, match="k must have q's rank"):
        ops.rotary(q, torch.randn(4, 1, 8), COS, SIN)
    with pytest.raises(ValueError, match="q must be"):
        ops.rotary(torch.randn(4, 8), torch.randn(4, 8), COS, SIN)
    with pytest.raises(ValueError, match="k must be .*total"):
        ops.rotary(torch.randn(4, 2, 8), torch.randn(5, 2, 8), COS, SIN)
    with pytest.raises(ValueError, match="sin must have cos's shape"):
        ops.rotary(q, k, COS, SIN[:, :2])
    with pytest.raises(ValueError, match="cos must be a .max_pos, rot_dim / 2. table"):
        ops.rotary(q, k, COS[0], SIN[0])


def test_rot_dim_past_head_dim_and_odd():
    q, k = qk(d=6)
    with pytest.raises(ValueError, match="rotary dim 2 \\* cos.shape\\[1\\] = 8 exceeds .* head_dim 6"):
        ops.rotary(q, k, COS, SIN)
    with pytest.raises(ValueError, match="dim .* must be an even int"):
        ops.rotary_tables(7, 16)


def test_dtypes():
    q, k = qk()
    with pytest.raises(TypeError, match="k must have q's dtype"):
        ops.rotary(q, k.half(), COS, SIN)
    with pytest.raises(TypeError, match="q must be float32"):
        ops.rotary(q.int(), k.int(), COS, SIN)
    with pytest.raises(TypeError, match="cos must be float32"):
        ops.rotary(q, k, COS.bfloat16(), SIN.bfloat16())
    with pytest.raises(TypeError, match="positions must be int32 or int64"):
        ops.rotary(q, k, COS, SIN, torch.zeros(2))
    with pytest.raises(TypeError, match="interleaved must be a bool"):
        ops.rotary(q, k, COS, SIN, None, 1)


def test_positions_shape():
    q, k = qk()
    with pytest.raises(ValueError, match=r"positions must be \(batch,\) offsets or \(batch, seqlen\)"):
        ops.rotary(q, k, COS, SIN, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"positions must be \(total,\)"):
        ops.rotary(torch.randn(4, 2, 8), torch.randn(4, 1, 8), COS, SIN, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("backend", ["", "cpu", "reference", "triton"])
def test_positions_past_the_table(backend):
    """16 table rows: 0 .. 15. Checked before any kernel runs, on every backend."""
    q, k = qk(s=4)
    cases = [
        (torch.tensor([0, 13]), "0 .. 12"),  # offsets: 13 + 3 = 16 is past the table
        (torch.tensor([-1, 0]), "0 .. 12"),
        (torch.tensor([[0, 1, 2, 16], [0, 1, 2, 3]]), "0 .. 15"),
        (torch.tensor([[0, 1, 2, -3], [0, 1, 2, 3]], dtype=torch.int32), "0 .. 15"),
    ]
    for positions, allowed in cases:
        with pytest.raises(ValueError, match=f"positions must lie in {allowed}"):
            ops.rotary(q, k, COS, SIN, positions, backend=backend or None)
    ops.rotary(q, k, COS, SIN, torch.tensor([0, 12]), backend=backend or None)  # the last that fits
    with pytest.raises(ValueError, match="past the table's 16 positions"):
        ops.rotary(*qk(s=17), COS, SIN, backend=backend or None)


def test_cpp_kernel_refuses_positions_past_the_table():
    """The C++ kernel op called directly checks too (it never reads outside the table)."""
    q, k = qk()
    with pytest.raises(RuntimeError, match="positions must lie in 0 .. 12"):
        torch.ops.fastarch._rotary(q, k, COS, SIN, torch.tensor([0, 13]), False, False)
    with pytest.raises(RuntimeError, match="exceeds the head dim"):
        torch.ops.fastarch._rotary(q[..., :6].contiguous(), k[..., :6].contiguous(), COS, SIN, None, False, False)


def test_tables_that_require_grad():
    q, k = qk()
    with pytest.raises(ValueError, match="cos and sin get no gradient"):
        ops.rotary(q, k, COS.clone().requires_grad_(True), SIN)


def test_tables_arguments():
    with pytest.raises(ValueError, match="max_pos must be an int >= 1"):
        ops.rotary_tables(8, 0)
    with pytest.raises(ValueError, match="rope_type must be one of"):
        ops.rotary_tables(8, 16, rope_scaling={"rope_type": "longrope"})
    with pytest.raises(ValueError, match="'llama3' needs 'low_freq_factor'"):
        ops.rotary_tables(8, 16, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="base must be a finite number > 1"):
        ops.rotary_tables(8, 16, base=float("inf"))
    with pytest.raises(ValueError, match="base must be a finite number > 1"):  # (past the float range)
        ops.rotary_tables(8, 16, base=10**400)


@pytest.mark.parametrize("scaling,key", [
    ({"rope_type": "linear", "factor": 0}, "factor"),
    ({"rope_type": "linear", "factor": float("nan")}, "factor"),
    ({"rope_type": "yarn", "factor": 0.0, "original_max_position_embeddings": 16}, "factor"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
    ({"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 0}, "max_position_embeddings"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": -1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}, "low_freq_factor"),
    ({"rope_type": "linear", "factor": "2"}, "factor"),
    ({"rope_type": "linear", "factor": 10**400}, "factor"),  # (an int past the float range)
])
def test_tables_scaling_values(scaling, key):
    """A factor or context length that is not a finite number > 0 is refused by name (it had
    given all-NaN tables, a ZeroDivisionError or a bare math domain error)."""
    with pytest.raises(ValueError, match=rf"rope_scaling\['{key}'\] must be a finite number > 0"):
        ops.rotary_tables(8, 16, rope_scaling=scaling)


def test_tables_types():
    with pytest.raises(TypeError, match="rope_scaling must be a dict or None, got list"):
        ops.rotary_tables(8, 16, rope_scaling=[1, 2])
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        ops.rotary_tables(8, 16, dtype=torch.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_positions_past_the_table_on_cuda(backend):
    """A device-side assert (the host does not wait for the GPU to read the positions); it
    leaves the CUDA context unusable, so it runs in a process of its own."""
    import subprocess
    import sys

    code = (
        "import torch, fastarch\n"
        "cos, sin, _ = fastarch.ops.rotary_tables(8, 16, device='cuda')\n"
        "q, k = torch.randn(2, 2, 4, 8, device='cuda'), torch.randn(2, 1, 4, 8, device='cuda')\n"
        "positions = torch.tensor([0, 13], device='cuda')\n"
        f"fastarch.ops.rotary(q, k, cos, sin, positions, backend={backend!r})\n"
        "torch.cuda.synchronize()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "assert" in out.stderr.lower(), out.stderr[-2000:]
