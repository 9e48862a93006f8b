"""Numerics of fastarch.ops.attention on every backend, judged as flash-attention judges its
kernels: the error of our output against an fp64 reference must be at most FORWARD_FACTOR x
the error of the same computation done entirely in the inputs' dtype (the reference with
upcast=False: bf16/fp16 matmuls and softmax, as PyTorch's math path in that dtype) plus a
floor of about two roundings of the dtype at the output's scale (attention_tolerance.py,
flash-attention's atol); gradients GRAD_FACTOR x. Our kernels
keep the softmax statistics and accumulators in fp32 and round once, so an honest kernel
lands well under 1x; a wrong mask, scale or rescaling lands at 10x-1000x.

Backends: every one registered for "attention" that can run here (the CUDA and GPU-Triton
rows are marked gpu); Triton runs in its CPU interpreter without a GPU, on smaller shapes.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import backend_rows  # tests/backend_rows.py
from attention_tolerance import floor  # tests/ops/attn/attention_tolerance.py
from fastarch import ops, registry
from fastarch.ops.attn import backends
from fastarch.ops.attn.args import AttentionArgs, AttentionProblem
from fastarch.ops.attn.reference import attention_backward_ref, attention_forward_ref

HAS_CUDA = torch.cuda.is_available()
GPU = pytest.mark.gpu

FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0
# lse: fp32 statistics in every kernel; half-precision kernels may use a faster exp (~1e-4)
LSE_TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 1e-3, torch.bfloat16: 1e-3}
# relative to max |reference|: a few ulps at 1.0 (the outputs are averages of values ~1)


BACKENDS = backend_rows.rows("attention")
SEQLENS = [(1, 1), (1, 239), (113, 203), (128, 128), (1023, 1024), (200, 50)]
# What each backend claims (its supports check must agree; a decline fails the row):
# the CUDA kernels take multiples of 8 up to 256, Triton any head dim up to 256, the CPU
# kernels up to 512, the reference any.
HEAD_DIMS = {"cuda": [32, 64, 96, 128, 256], "triton": [32, 59, 64, 111, 128, 256]}
HEAD_DIMS_DEFAULT = [32, 59, 64, 111, 128, 256]


def _dtypes(backend: str, device: str) -> list[torch.dtype]:
    if device == "cuda":  # Triton's fp32 runs exact fp32 dots on a GPU (not in the interpreter)
        return [torch.float16, torch.bfloat16] + ([torch.float32] if backend == "triton" else [])
    return [torch.float32, torch.bfloat16, torch.float16]


def _slow(backend: str, device: str) -> bool:
    """Runs in an interpreter or in plain PyTorch: keep its shapes small."""
    return backend == "reference" or (backend == "triton" and device == "cpu")


def require(backend: str, q, k, v, decode: bool = False, **features) -> None:
    """Skips the row when ``backend`` cannot run here; fails it when it declines the case."""
    backend_rows.require("attention_decode" if decode else "attention", backend,
                         AttentionProblem.of(q, k, v, AttentionArgs(**features), decode=decode))


# ----------------------------------------------------------------------------- helpers


def make_qkv(b, h, hkv, sq, sk, d, dtype, device, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, sk, dv or d, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype).to(device) for t in (q, k, v))


def err(a, ref) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def check(name, ours, baseline, truth, dtype, factor):
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: not finite"
    e_ours, e_base = err(ours, truth), err(baseline, truth)
    bound = factor * e_base + floor(truth, dtype, grad=name in ("dq", "dk", "dv"))
    assert e_ours <= bound, f"{name}: error {e_ours:.3g} > {factor} x same-dtype error {e_base:.3g} + floor = {bound:.3g}"


def kernel_args(q, k, v, causal=False, scale=None, attn_mask=None, kpm=None, cu_q=None, cu_k=None, window=(-1, -1),
                dropout_p=0.0, seed=None) -> AttentionArgs:
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return AttentionArgs(attn_mask, kpm, cu_q, cu_k, q.shape[2], k.shape[2], causal, scale, window[0], window[1],
                         dropout_p, seed)


def compare(backend, q, k, v, dtype, grads=True, **kw):
    """Runs ours (through the public op's kernel-level call) and checks out, lse and the
    gradients against the fp64 reference, with the same-dtype reference as the yardstick."""
    args = kernel_args(q, k, v, **kw)
    from fastarch.ops.attn.api import _attention, _attention_backward

    qs, ks, vs = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    out, lse = _attention(qs, ks, vs, *args.fields(), backend)
    truth, truth_lse = attention_forward_ref(q.double(), k.double(), v.double(), args)
    base, _ = attention_forward_ref(q, k, v, args, upcast=False)
    check("out", out, base, truth, dtype, FORWARD_FACTOR)
    seen = torch.isfinite(truth_lse)
    assert torch.equal(torch.isfinite(lse), seen), "lse: -inf exactly for the queries that see no key"
    assert (out[~seen] == 0).all(), "a query that sees no key must give zeros"
    if seen.any():
        lse_tol = LSE_TOL[dtype] + 1e-6 * truth_lse[seen].abs().max()
        assert (lse.double()[seen] - truth_lse[seen]).abs().max() <= lse_tol
    if not grads:
        return out
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(q)
    dq, dk, dv = _attention_backward(dout, q, k, v, out.detach(), lse, *args.fields(), backend)
    t_grads = attention_backward_ref(dout.double(), q.double(), k.double(), v.double(), None, None, args)
    b_grads = attention_backward_ref(dout, q, k, v, None, None, args, upcast=False)
    for name, a, b, t in zip(("dq", "dk", "dv"), (dq, dk, dv), b_grads, t_grads):
        check(name, a, b, t, dtype, GRAD_FACTOR)
    return out


# ----------------------------------------------------------------------------- the table


def _table():
    """backend x dtype x (Sq, Sk) x head dim x causal x grouped-query, each a case a user could
    hit. The interpreter and the reference get the small shapes and every other GQA row, and
    the interpreter a Latin square of dtype x head dim x shape (backend_rows.interpreter_keeps:
    each dtype meets each head dim and each shape); the largest shape runs three head dims,
    every other GQA row, marked slow (CI runs them, the default command does not)."""
    for bp in BACKENDS:
        backend, device = bp.values
        slow = _slow(backend, device)
        for i, dtype in enumerate(_dtypes(backend, device)):
            for n, (sq, sk) in enumerate(SEQLENS):
                if slow and sq * sk > 128 * 256:
                    continue
                large = sq * sk > 500_000
                for j, d in enumerate(HEAD_DIMS.get(backend, HEAD_DIMS_DEFAULT)):
                    if (slow and d not in (32, 59, 128)) or (large and d not in (64, 111, 128)):
                        continue
                    if not backend_rows.interpreter_keeps(backend, device, i, (32, 59, 128).index(d) if slow else j, n):
                        continue
                    for causal in (False, True):
                        for gqa in (False, True):
                            if (slow or large) and gqa != ((n + d) % 2 == 1):
                                continue
                            marks = list(bp.marks) + ([pytest.mark.slow] if large else [])
                            yield pytest.param(
                                backend, device, dtype, sq, sk, d, causal, gqa, marks=marks,
                                id=f"{backend}-{str(dtype)[6:]}-{sq}x{sk}-d{d}-{'causal' if causal else 'full'}{'-gqa' if gqa else ''}",
                            )


@pytest.mark.parametrize("backend,device,dtype,sq,sk,d,causal,gqa", list(_table()))
def test_forward_backward(backend, device, dtype, sq, sk, d, causal, gqa):
    h, hkv = (4, 1) if gqa else (2, 2)
    q, k, v = make_qkv(2 if sq * sk < 200_000 else 1, h, hkv, sq, sk, d, dtype, device)
    require(backend, q, k, v)
    compare(backend, q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("d", [59, 264, 600])
def test_declined_head_dims_name_the_reason(d):
    """Forcing a backend on a head dim it does not claim raises NoBackendError with its
    reason; the automatic choice falls back to one that runs it (the reference at 600)."""
    q, k, v = make_qkv(1, 2, 2, 5, 7, d, torch.float16, "cpu")
    # the CUDA kernels' rule, on a CUDA problem (no GPU needed to ask)
    cuda_problem = AttentionProblem.of(q, k, v)._replace(device="cuda")
    assert "is not a multiple of 8 up to 256" in (backends.cuda_supports(cuda_problem) or ""), d
    for backend, limit in (("cuda", 256), ("triton", 256), ("cpu", 512)):
        entry = next(b for b in registry.backends_of("attention") if b.name == backend)
        why = entry.supports(AttentionProblem.of(q, k, v))
        if backend == "cuda" or d > limit:
            assert why is not None, (backend, d)
        if why is not None:
            with pytest.raises(registry.NoBackendError, match=f"{backend}: "):
                ops.attention(q, k, v, backend=backend)
    out = ops.attention(q.float(), k.float(), v.float())
    assert out.shape == (1, 2, 5, d) and torch.isfinite(out).all()


FEATURES = {  # name -> keyword arguments of kernel_args (given q, k, v of (2, 4|2, 37, 45, 64))
    "window-left": lambda q, k, v: dict(causal=True, window=(9, -1)),
    "window-both": lambda q, k, v: dict(window=(5, 3)),
    "key-padding": lambda q, k, v: dict(kpm=torch.arange(k.shape[2], device=q.device)[None, :] < torch.tensor([[30], [45]][: q.shape[0]], device=q.device)),
    "bool-mask": lambda q, k, v: dict(attn_mask=_additive(torch.rand(q.shape[0], 1, q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(2)) > 0.3, q)),
    "float-mask": lambda q, k, v: dict(attn_mask=(torch.randn(1, q.shape[1], q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(3))).to(q).expand(q.shape[0], -1, -1, -1)),
    "fully-masked-rows": lambda q, k, v: dict(causal=True, window=(0, 0), kpm=torch.arange(k.shape[2], device=q.device)[None, :].expand(q.shape[0], -1) % 2 == 0),
    "scale": lambda q, k, v: dict(scale=0.37),
    "dropout": lambda q, k, v: dict(dropout_p=0.2, seed=torch.tensor(1234)),
    "dropout-causal-gqa": lambda q, k, v: dict(causal=True, dropout_p=0.5, seed=torch.tensor(99)),
}


def _additive(bool_mask, q):
    return torch.zeros((), dtype=q.dtype).masked_fill(~bool_mask, float("-inf")).to(q.device).expand(q.shape[0], q.shape[1], -1, -1)


# (B, H, Sq, Sk, D): a shape with Sq < Sk and one with Sq > Sk, different head dims.
FEATURE_SHAPES = [(2, 4, 37, 45, 64), (1, 4, 130, 77, 40)]


def _feature_table():
    """backend x dtype x feature x shape; the interpreter runs a Latin-square third
    (backend_rows.interpreter_keeps: each feature in two dtypes, one per shape)."""
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    for bp in BACKENDS:
        backend, device = bp.values
        for (i, dtype), (j, feature), (n, shape) in itertools.product(enumerate(dtypes), enumerate(FEATURES),
                                                                      enumerate(FEATURE_SHAPES)):
            if backend == "cuda" and dtype == torch.float32:  # the CUDA kernels run fp16 and bf16
                continue
            if backend_rows.interpreter_keeps(backend, device, i, j, n):
                yield pytest.param(backend, device, dtype, feature, shape, marks=bp.marks,
                                   id=f"{bp.id}-{str(dtype)[6:]}-{feature}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("backend,device,dtype,feature,shape", list(_feature_table()))
def test_features(backend, device, dtype, feature, shape):
    b, h, sq, sk, d = shape
    if backend == "cuda" and d % 8:
        d = 64
    gqa = "gqa" in feature
    q, k, v = make_qkv(b, h, 1 if gqa else h, sq, sk, d, dtype, device, seed=7)
    kw = FEATURES[feature](q, k, v)
    features = dict(attn_mask=kw.get("attn_mask"), key_padding_mask=kw.get("kpm"), dropout_p=kw.get("dropout_p", 0.0),
                    window_left=kw.get("window", (-1, -1))[0], window_right=kw.get("window", (-1, -1))[1])
    require(backend, q, k, v, **features)
    compare(backend, q, k, v, dtype, **kw)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_varlen(backend, device):
    dtype = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(11)
    lens_q, lens_k = [5, 1, 17, 0, 33], [7, 0, 17, 3, 20]  # a sequence with a query and no key
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(1, 4, sum(lens_q), 64, generator=g).to(dtype).to(device)
    k = torch.randn(1, 2, sum(lens_k), 64, generator=g).to(dtype).to(device)
    v = torch.randn(1, 2, sum(lens_k), 64, generator=g).to(dtype).to(device)
    # the packed layout the public op makes: (total, H, D) viewed as (1, H, total, D)
    q, k, v = (t[0].permute(1, 0, 2).contiguous().permute(1, 0, 2)[None] for t in (q, k, v))
    require(backend, q, k, v, cu_seqlens_q=cu_q)
    for causal in (False, True):
        compare(backend, q, k, v, dtype, causal=causal, cu_q=cu_q, cu_k=cu_k)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_index_tensors(backend, device):
    """cu_seqlens, key_padding_mask and cache_seqlens given as strided views give what their
    contiguous copies give (the kernels index them as arrays)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    q, k, v = make_qkv(2, 2, 2, 9, 13, 32, dtype, device)
    kpm = (torch.arange(13)[:, None] < torch.tensor([13, 6])).to(device).t()  # (2, 13), transposed memory
    require(backend, q, k, v, key_padding_mask=kpm)
    expected = ops.attention(q, k, v, key_padding_mask=kpm.contiguous(), backend=backend)
    torch.testing.assert_close(ops.attention(q, k, v, key_padding_mask=kpm, backend=backend), expected, rtol=0, atol=0)
    qp, kp, vp = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # (total, H, D)
    cu_q = torch.tensor([0, 99, 4, 99, 9], dtype=torch.int32, device=device)[::2]
    cu_k = torch.tensor([0, 99, 7, 99, 13], dtype=torch.int32, device=device)[::2]
    expected = ops.attention(qp, kp, vp, cu_seqlens_q=cu_q.contiguous(), cu_seqlens_k=cu_k.contiguous(), causal=True,
                             backend=backend)
    got = ops.attention(qp, kp, vp, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    lens = torch.tensor([5, 99, 11, 99], dtype=torch.int32, device=device)[::2]
    expected = ops.attention_decode(q[:, :, :1], k, v, lens.contiguous(), backend=backend)
    torch.testing.assert_close(ops.attention_decode(q[:, :, :1], k, v, lens, backend=backend), expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dropout_rate_and_reproducibility(backend, device):
    dtype = torch.float16 if device == "cuda" else torch.float32
    q, k, v = make_qkv(1, 2, 2, 64, 256, 32, dtype, device)
    require(backend, q, k, v, dropout_p=0.25)
    # with v = identity rows, out holds the kept, rescaled probabilities themselves
    v = torch.eye(256, 32, dtype=dtype, device=device)[None, None].expand(1, 2, 256, 32).contiguous()
    q = torch.zeros_like(q)  # uniform probabilities 1/256
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = ops.attention(q, k, v, dropout_p=0.25, generator=g1, backend=backend)
    b = ops.attention(q, k, v, dropout_p=0.25, generator=g2, backend=backend)
    assert torch.equal(a, b), "the same generator state must give the same mask"
    kept = (a.float() > 0).float().mean().item()
    assert abs(kept - 0.75) < 0.05, f"kept fraction {kept:.3f}, expected 0.75"
    rescaled = torch.full_like(a[a > 0].float(), 1 / (256 * 0.75))  # kept ones scaled by 1 / (1 - p)
    torch.testing.assert_close(a[a > 0].float(), rescaled, rtol=1e-3, atol=0)
    c = ops.attention(q, k, v, dropout_p=0.25, generator=torch.Generator().manual_seed(6), backend=backend)
    assert not torch.equal(a, c)


def test_public_api_layouts_and_lse():
    """The public op: packed input/output layouts, return_lse, torch's SDPA equivalence."""
    q, k, v = make_qkv(2, 4, 2, 9, 13, 16, torch.float32, "cpu")
    out, lse = ops.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == (2, 4, 9, 16) and lse.shape == (2, 4, 9) and lse.dtype == torch.float32
    mask = torch.ones(9, 13, dtype=torch.bool).tril(13 - 9)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    qp, kp, vp = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # (S, H, D)
    cu_q, cu_k = torch.tensor([0, 9], dtype=torch.int32), torch.tensor([0, 13], dtype=torch.int32)
    packed, plse = ops.attention(qp, kp, vp, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, return_lse=True)
    assert packed.shape == (9, 4, 16) and plse.shape == (4, 9)
    torch.testing.assert_close(packed, out[0].transpose(0, 1), rtol=1e-6, atol=1e-6)


DECODE_BACKENDS = backend_rows.rows("attention_decode")


@pytest.mark.parametrize("new", [1, 4])
@pytest.mark.parametrize("d", [59, 64, 128])
@pytest.mark.parametrize("backend,device", DECODE_BACKENDS)
def test_decode_matches_reference(backend, device, d, new):
    """Decoding against the fp64 truth of attention over each sequence's filled cache, with
    the same-dtype error as the yardstick (as compare())."""
    if backend == "cuda" and d % 8:
        d = 64  # the CUDA kernels take multiples of 8 (supports() says so)
    B, H, Hkv, S_max = 3, 8, 2, 300
    for dtype in _dtypes(backend, device):
        g = torch.Generator().manual_seed(3)
        k_cache, v_cache = (torch.randn(B, Hkv, S_max, d, generator=g).to(dtype).to(device) for _ in range(2))
        q = torch.randn(B, H, new, d, generator=g).to(dtype).to(device)
        seqlens = torch.tensor([new, 157, 300], dtype=torch.int32, device=device)
        require(backend, q, k_cache, v_cache, decode=True, window_left=20)
        for window in (-1, 20):
            out, lse = ops.attention_decode(q, k_cache, v_cache, seqlens, window=None if window < 0 else window,
                                            return_lse=True, backend=backend)
            for b in range(B):
                n = int(seqlens[b])
                seq = (q[b : b + 1], k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n])
                args = kernel_args(*seq, causal=True, window=(window, -1))
                truth, truth_lse = attention_forward_ref(*(t.double() for t in seq), args)
                base, _ = attention_forward_ref(*seq, args, upcast=False)
                check(f"{dtype} window {window} sequence {b}", out[b : b + 1], base, truth, dtype, FORWARD_FACTOR)
                lse_tol = LSE_TOL[dtype] + 1e-6 * truth_lse.abs().max()
                assert (lse[b : b + 1].double() - truth_lse).abs().max() <= lse_tol


@pytest.mark.parametrize(
    "backend,device", [row for row in DECODE_BACKENDS if row.values[1] == "cuda"] or [pytest.param("cuda", "cuda", marks=GPU)]
)
def test_decode_clamps_cache_seqlens_on_gpu(backend, device):
    """On a GPU the values of cache_seqlens are not checked on the host (that would synchronize
    every decoding step): the kernels clamp them to 0 .. S_max, reading nothing outside."""
    g = torch.Generator().manual_seed(4)
    k_cache, v_cache = (torch.randn(2, 2, 50, 64, generator=g).half().to(device) for _ in range(2))
    q = torch.randn(2, 4, 1, 64, generator=g).half().to(device)
    wild = ops.attention_decode(q, k_cache, v_cache, torch.tensor([60, -3], dtype=torch.int32, device=device),
                                backend=backend)
    clamped = ops.attention_decode(q, k_cache, v_cache, torch.tensor([50, 0], dtype=torch.int32, device=device),
                                   backend=backend)
    assert torch.equal(wild, clamped)
    assert (clamped[1] == 0).all()  # a sequence with no keys gives zeros


def test_reference_decode_clamps_cache_seqlens_like_the_gpu_kernels():
    """The reference backend also runs CUDA tensors (fp64, head dims above 256), whose
    cache_seqlens values are not checked on the host: it clamps them as the kernels do."""
    from fastarch.ops.attn.reference import attention_decode_ref

    g = torch.Generator().manual_seed(6)
    k_cache, v_cache = (torch.randn(2, 2, 50, 16, generator=g, dtype=torch.float64) for _ in range(2))
    q = torch.randn(2, 4, 1, 16, generator=g, dtype=torch.float64)
    wild = attention_decode_ref(q, k_cache, v_cache, torch.tensor([60, -3], dtype=torch.int32), True, 0.25, -1)
    clamped = attention_decode_ref(q, k_cache, v_cache, torch.tensor([50, 0], dtype=torch.int32), True, 0.25, -1)
    for a, b in zip(wild, clamped):
        assert torch.equal(a, b)
    assert (clamped[0][1] == 0).all() and torch.isneginf(clamped[1][1]).all()


