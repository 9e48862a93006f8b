"""The attention forward and backward through oneDNN's brgemm (csrc/cpu/attn/brgemm.h,
attention_fwd_brgemm.cpp, and attention_bwd_avx512.cpp's products when BackwardParams::brgemm):
the AMX path of bf16, forced with fastarch._C._set_cpu_brgemm("on") so that it runs on any
AVX512-BF16 CPU (oneDNN runs AVX-512 code there, the AMX tiles on an AMX CPU), and the fp32
products "on" gives fp32 and fp16 inputs (oneDNN's AVX-512 code on every CPU). A CPU or build
without AVX512-BF16 skips with the reason.

Numerics as test_attention.py judges them (compare(): out, lse and the gradients against the
fp64 reference, within FORWARD_FACTOR / GRAD_FACTOR x the error of the same computation in bf16
plus attention_tolerance's floor): odd lengths, head dims 64 and 128 and the odd and large ones
the packing pads (the backward's dK and dV products in several 64-column panels: D 111, 128,
256, Dv 80), Sq != Sk both ways, several key blocks (256 keys) and query blocks (128 queries),
causal and not, grouped-query heads, the FEATURES table (windows, masks, fully masked rows,
dropout), packed sequences; then fully masked rows, and NaN in, NaN out through the forward and
the backward (test_attention_nan.py's table).
"""

from __future__ import annotations

import os

import pytest
import torch

import backend_rows  # tests/backend_rows.py

from fastarch import _extension
from fastarch.ops.attn import cpp as attention_kernels
from test_attention import FEATURES, compare, kernel_args, make_qkv
from test_attention_cpu_isa import HUGE_BF16_MASKS, check_huge_bf16_mask
import test_attention_nan as nan_table

_C = _extension._C
pytestmark = pytest.mark.skipif(_C is None, reason=f"fastarch._C is not loaded: {_extension.LOAD_ERROR}")
BF16 = torch.bfloat16
DTYPES = [torch.bfloat16, torch.float32, torch.float16]
DEFAULT_BRGEMM = os.environ.get("FASTARCH_CPU_BRGEMM", "").strip() or "auto"


@pytest.fixture
def brgemm():
    """The brgemm forward forced on (at the automatic isa level); the process's choice afterwards."""
    _C._set_cpu_isa(backend_rows.DEFAULT_ISA)
    try:
        _C._set_cpu_brgemm("on")
    except ValueError as e:  # the CPU lacks AVX512-BF16, or the build the AVX-512 kernels
        pytest.skip(f"the brgemm attention cannot run here: {e}")
    if not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        _C._set_cpu_brgemm(DEFAULT_BRGEMM)
        pytest.skip("torch's oneDNN (brgemm) is disabled or missing: the register tiles run instead")
    info = _C.build_info()
    if not info["cpu_attention_brgemm"]:
        _C._set_cpu_brgemm(DEFAULT_BRGEMM)
        if info["cpu_brgemm_check"] != "passed":  # oneDNN's brgemm is wrong here: a finding, not a skip
            pytest.fail(f"brgemm's check: {info['cpu_brgemm_check']}")
        pytest.skip(f"FASTARCH_CPU_ISA={backend_rows.DEFAULT_ISA} runs no bf16 AVX-512 kernel")
    yield
    _C._set_cpu_brgemm(DEFAULT_BRGEMM)


def test_the_switch_selects_the_path(brgemm):
    assert _C.build_info()["cpu_attention_brgemm"]
    assert _C.build_info()["cpu_attention_brgemm_fp32"]
    level = _C.build_info()["cpu_isa"]
    assert _extension.cpu_path("attention", BF16) == f"cpu/{level}" + ("" if level == "amx" else "+brgemm")
    assert _extension.cpu_path("attention", torch.float32) == f"cpu/{level}+brgemm"
    assert _extension.cpu_path("attention_decode", BF16) == f"cpu/{level}"
    _C._set_cpu_brgemm("off")
    assert not _C.build_info()["cpu_attention_brgemm"] and not _C.build_info()["cpu_attention_brgemm_fp32"]
    assert _extension.cpu_path("attention", BF16) == f"cpu/{level}" + ("+tiles" if level == "amx" else "")
    assert _extension.cpu_path("attention", torch.float32) == f"cpu/{level}"
    _C._set_cpu_brgemm("auto")  # bf16 through brgemm at level amx only, fp32 and fp16 never
    assert _C.build_info()["cpu_attention_brgemm"] == (level == "amx")
    assert not _C.build_info()["cpu_attention_brgemm_fp32"]
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        _C._set_cpu_brgemm("yes")


def test_brgemm_check_passed(brgemm):
    """brgemm.h's check of oneDNN's products on this CPU (exact integer products in the kernels'
    layouts) ran when the mode first asked for brgemm, and passed; with brgemm off it is not
    asked for."""
    assert _C.build_info()["cpu_brgemm_check"] == "passed"
    _C._set_cpu_brgemm("off")
    assert _C.build_info()["cpu_brgemm_check"] == "not run"


def test_differs_from_the_register_tiles_only_by_rounding(brgemm):
    """Both paths round P to bf16 and sum in fp32, in other orders: close, and not the same
    code (a switch that changed nothing would give identical bits on every element)."""
    q, k, v = make_qkv(1, 4, 2, 300, 333, 64, BF16, "cpu", seed=12)
    args = kernel_args(q, k, v, causal=True)
    ours, ours_lse = attention_kernels.forward(q, k, v, args)
    _C._set_cpu_brgemm("off")
    tiles, tiles_lse = attention_kernels.forward(q, k, v, args)
    assert (ours.float() - tiles.float()).abs().max() <= 2e-2
    assert (ours_lse - tiles_lse).abs().max() <= 1e-3
    assert not torch.equal(ours_lse, tiles_lse)


@pytest.mark.parametrize("dtype", [BF16, torch.float32], ids=str)
def test_backward_differs_from_the_register_tiles_only_by_rounding(brgemm, dtype):
    """The backward alone, from the same out and lse: its five products through brgemm or our
    register tiles sum the same products in fp32 in other orders (dK's and dV's across two
    panels at D 128), so the gradients are close (within a few units of the dtype's rounding of
    these O(1) values) and not the same bits."""
    q, k, v = make_qkv(1, 4, 2, 150, 203, 128, dtype, "cpu", seed=5)
    args = kernel_args(q, k, v, causal=True)
    out, lse = attention_kernels.forward(q, k, v, args)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    ours = attention_kernels.backward(dout, q, k, v, out, lse, args)
    _C._set_cpu_brgemm("off")
    tiles = attention_kernels.backward(dout, q, k, v, out, lse, args)
    for name, a, b in zip(("dq", "dk", "dv"), ours, tiles):
        scale = b.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= (2e-2 if dtype == BF16 else 1e-5) * scale, name
    assert not all(torch.equal(a, b) for a, b in zip(ours, tiles))


# (B, H, Hkv, Sq, Sk, D, Dv): head dims 64 and 128 with odd lengths over several query and key
# blocks (and partial key panels of 64), one query and one key, Sq > Sk (causal: queries that see no key), odd head dims (K
# padded to even), Dv != D and not a multiple of 16, 256 (four V panels), grouped-query heads.
SHAPES = [
    (1, 2, 2, 1, 1, 64, 64),
    (2, 4, 2, 113, 203, 64, 64),
    (1, 2, 1, 257, 557, 128, 128),
    (1, 3, 3, 200, 50, 128, 128),
    (1, 2, 2, 67, 131, 59, 59),
    (1, 4, 1, 70, 129, 111, 111),
    (1, 2, 1, 50, 60, 48, 80),
    (1, 1, 1, 40, 300, 256, 256),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(brgemm, shape, causal, dtype):
    b, h, hkv, sq, sk, d, dv = shape
    q, k, v = make_qkv(b, h, hkv, sq, sk, d, dtype, "cpu", dv=dv)
    compare("cpu", q, k, v, dtype, causal=causal)


# brgemm.h's BrgemmBlocks (fwd_m, fwd_n, bwd_q, bwd_k) other than the defaults, as
# bench/attention_cpu_paths.py --blocks sets them: the smallest, a query block of several panels
# in the backward (its S^T, dP^T and dQ^T products in panels too), the largest, and uneven ones.
BLOCKS = [(16, 64, 16, 16), (64, 128, 128, 128), (256, 512, 256, 256), (48, 192, 80, 112)]


@pytest.fixture(params=BLOCKS, ids=lambda b: "x".join(map(str, b)))
def blocks(request, brgemm):
    default = _C._cpu_brgemm_blocks()
    _C._set_cpu_brgemm_blocks(*request.param)
    yield request.param
    _C._set_cpu_brgemm_blocks(*default)


@pytest.mark.parametrize("dtype", [BF16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 2, 113, 203, 64, 64), (1, 2, 1, 300, 557, 128, 128),
                                   (1, 2, 2, 67, 131, 59, 80)], ids=lambda s: "x".join(map(str, s)))
def test_other_block_sizes(blocks, shape, dtype):
    """Each block size gives the same accuracy (forward and backward, causal and with a window
    that the blocks cut), and a set size is the one the calls run."""
    assert _C._cpu_brgemm_blocks() == blocks
    b, h, hkv, sq, sk, d, dv = shape
    q, k, v = make_qkv(b, h, hkv, sq, sk, d, dtype, "cpu", dv=dv, seed=9)
    compare("cpu", q, k, v, dtype, causal=True)
    compare("cpu", q, k, v, dtype, window=(70, 20))


def test_block_sizes_out_of_range_are_refused(brgemm):
    default = _C._cpu_brgemm_blocks()
    assert default == (128, 256, 64, 64)
    for bad, match in [((0, 256, 64, 64), "fwd_m must be a multiple of 16 from 16 to 512, got 0"),
                       ((128, 96, 64, 64), "fwd_n must be a multiple of 64 from 64 to 512, got 96"),
                       ((128, 256, 65, 64), "bwd_q must be a multiple of 16 from 16 to 512, got 65"),
                       ((128, 256, 64, 1024), "bwd_k must be a multiple of 16 from 16 to 512, got 1024")]:
        with pytest.raises(ValueError, match=match):
            _C._set_cpu_brgemm_blocks(*bad)
    assert _C._cpu_brgemm_blocks() == default


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features(brgemm, feature, dtype):
    q, k, v = make_qkv(2, 4, 1 if "gqa" in feature else 4, 97, 145, 64, dtype, "cpu", seed=7)
    compare("cpu", q, k, v, dtype, **FEATURES[feature](q, k, v))


def test_varlen(brgemm):
    lens_q, lens_k = [5, 1, 17, 0, 33, 170], [7, 0, 17, 3, 20, 290]  # a sequence with queries and no key
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    g = torch.Generator().manual_seed(11)
    # the packed layout the public op makes: (total, H, D) viewed as (1, H, total, D)
    q = torch.randn(sum(lens_q), 4, 64, generator=g).to(BF16).permute(1, 0, 2)[None]
    k = torch.randn(sum(lens_k), 2, 64, generator=g).to(BF16).permute(1, 0, 2)[None]
    v = torch.randn(sum(lens_k), 2, 64, generator=g).to(BF16).permute(1, 0, 2)[None]
    for causal in (False, True):
        compare("cpu", q, k, v, BF16, causal=causal, cu_q=cu_q, cu_k=cu_k)
    compare("cpu", q, k, v, BF16, causal=True, cu_q=cu_q, cu_k=cu_k, window=(20, -1), dropout_p=0.1,
            seed=torch.tensor(3))


def test_fully_masked_rows_give_zeros(brgemm):
    """A batch whose keys are all padding, and causal queries before the first key: out 0,
    lse -inf, the other rows finite."""
    q, k, v = make_qkv(2, 2, 2, 150, 140, 64, BF16, "cpu", seed=3)
    kpm = torch.ones(2, 140, dtype=torch.bool)
    kpm[1] = False
    out, lse = attention_kernels.forward(q, k, v, kernel_args(q, k, v, causal=True, kpm=kpm))
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert (out[0, :, :10] == 0).all() and torch.isneginf(lse[0, :, :10]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0, :, 10:]).all()


def _seen(sq, sk, causal):
    i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
    return j <= i + (sk - sq) if causal else torch.ones(sq, sk, dtype=torch.bool)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_in_nan_out(brgemm, causal):
    """NaN in q: that query's out row and lse NaN, nothing else. NaN in k: every query that
    sees the key. NaN in v: that column of every query that sees the key, lse finite."""
    B, H, SQ, SK, D = 2, 4, 150, 570, 64  # two query blocks, three key blocks
    seen = _seen(SQ, SK, causal)
    q, k, v = make_qkv(B, H, 2, SQ, SK, D, BF16, "cpu", seed=4)
    q[1, 3, 70, 5] = float("nan")
    k[0, 1, 500, 7] = float("nan")  # kv head 1: query heads 2, 3 (the last, partial key block)
    v[1, 0, 120, 9] = float("nan")  # kv head 0: query heads 0, 1
    out, lse = attention_kernels.forward(q, k, v, kernel_args(q, k, v, causal=causal))
    expect = torch.zeros(B, H, SQ, dtype=torch.bool)
    expect[1, 3, 70] = True
    expect[0, 2:4] = seen[:, 500]
    assert torch.equal(torch.isnan(lse), expect)
    assert torch.equal(torch.isnan(out).all(-1), expect)
    vcol = torch.zeros(B, H, SQ, dtype=torch.bool)
    vcol[1, 0:2] = seen[:, 120]
    assert torch.isnan(out[..., 9][vcol]).all()
    rest = torch.isnan(out)
    rest[expect] = False
    rest[..., 9][vcol] = False
    assert not rest.any(), "NaN outside the rows and columns that depend on it"


@pytest.mark.parametrize("value", HUGE_BF16_MASKS.values(), ids=HUGE_BF16_MASKS.keys())
def test_bf16_masks_beyond_the_log2_range(brgemm, value):
    check_huge_bf16_mask(value)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("position", nan_table.POSITIONS)
def test_nan_through_forward_and_backward(brgemm, position, causal, gqa, dtype):
    """test_attention_nan.py's contract (out, lse, dq, dk, dv) for the CPU kernels with
    brgemm on."""
    nan_table.test_attention_nan("cpu", "cpu", dtype, position, causal, gqa)


def test_paths_bench_times_every_row(brgemm, tmp_path, monkeypatch):
    """bench/attention_cpu_paths.py (the GPU suite's amx stage runs it): a row per shape, dtype,
    pass and causal flag, every contender timed (another block size too); the brgemm choice, its
    block sizes and torch's threads as they were after."""
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[3] / "bench" / "attention_cpu_paths.py"
    path = tmp_path / "paths.json"
    monkeypatch.setattr(sys, "argv", [str(script), "--rounds", "1", "--shapes", "1x2x40x16", "--dtype", "bf16,fp32",
                                      "--blocks", "16x64/32x16", "--json", str(path)])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    result = json.loads(path.read_text())
    assert result["meta"]["level"] == _C.build_info()["cpu_isa"]
    assert result["meta"]["brgemm_check"] == "passed"
    assert [(r["dtype"], r["pass"], r["causal"]) for r in result["rows"]] == [
        (dtype, pass_, causal) for dtype in ("bf16", "fp32") for pass_ in ("fwd", "fwdbwd") for causal in (False, True)]
    assert all(r[f"{n}_ms"] > 0 for r in result["rows"] for n in ("brgemm", "tiles", "sdpa", "brgemm 16x64/32x16"))
    assert all(r["brgemm 16x64/32x16_vs_default"] > 0 for r in result["rows"])
    assert _C.build_info()["cpu_brgemm"] == "on"  # (the fixture's)
    assert _C._cpu_brgemm_blocks() == (128, 256, 64, 64)
