"""The attention ops as torch ops: torch.library.opcheck of every op (the public custom ops and
the kernel ops each backend registers), and torch.compile(fullgraph=True) of code that uses
them — every feature, forward and gradients compared with eager — including dynamic shapes."""

from __future__ import annotations

import pytest
import torch

from fastarch import ops

GPU = pytest.mark.gpu
HAS_CUDA = torch.cuda.is_available()


def randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def qkv(b=2, h=4, hkv=2, sq=9, sk=13, d=16, dv=None, **kw):
    return randn(b, h, sq, d, seed=1, **kw), randn(b, hkv, sk, d, seed=2, **kw), randn(b, hkv, sk, dv or d, seed=3, **kw)


# ----------------------------------------------------------------------------- opcheck

# The custom ops' arguments after q, k, v: AttentionArgs' fields, then the backend.
PLAIN = (None, None, None, None, 0, 0, True, 0.25, -1, -1, 0.0, None, "")


def test_opcheck_attention_and_its_backward():
    q, k, v = qkv()
    torch.library.opcheck(torch.ops.fastarch.attention.default, (q.requires_grad_(), k, v, *PLAIN))
    out, lse = torch.ops.fastarch.attention(q.detach(), k, v, *PLAIN)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastarch.attention_backward.default, (dout, q.detach(), k, v, out, lse, *PLAIN))


def test_opcheck_attention_with_masks_varlen_and_dropout():
    q, k, v = qkv()
    mask = randn(2, 1, 9, 13, seed=4).expand(2, 4, 9, 13)
    kpm = torch.arange(13)[None] < torch.tensor([[13], [6]])
    args = (mask, kpm, None, None, 0, 0, False, 0.25, 2, 3, 0.2, torch.tensor(7), "")
    torch.library.opcheck(torch.ops.fastarch.attention.default, (q.requires_grad_(), k, v, *args))
    qp, kp, vp = (t[0].permute(1, 0, 2).contiguous().permute(1, 0, 2)[None] for t in (q.detach(), k, v))
    cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 7, 13], dtype=torch.int32)
    varlen = (None, None, cu_q, cu_k, 5, 7, True, 0.25, -1, -1, 0.0, None, "")
    torch.library.opcheck(torch.ops.fastarch.attention.default, (qp.requires_grad_(), kp, vp, *varlen))


def test_opcheck_decode_and_append_kv():
    q, k, v = qkv(sq=2, sk=20)
    seqlens = torch.tensor([5, 13], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastarch.attention_decode.default, (q, k, v, seqlens, True, 0.25, 4, ""))
    k_new, v_new = randn(2, 2, 3, 16, seed=5), randn(2, 2, 3, 16, seed=6)
    torch.library.opcheck(torch.ops.fastarch.append_kv.default, (k.clone(), v.clone(), k_new, v_new, seqlens, ""))


@pytest.mark.parametrize("dv", [16, 24], ids=["dv=d", "dv!=d"])
def test_opcheck_cpu_kernel_ops(dv):
    """The C++ kernel ops themselves (schema, fake shapes, strides) on the CPU."""
    q, k, v = qkv(dv=dv)
    common = (None, None, None, None, 0, 0, True, 0.25, -1, -1, 0.0, 0)
    torch.library.opcheck(torch.ops.fastarch._attention_fwd.default, (q, k, v, *common))
    out, lse = torch.ops.fastarch._attention_fwd(q, k, v, *common)
    torch.library.opcheck(torch.ops.fastarch._attention_bwd.default, (torch.randn_like(out), q, k, v, out, lse, *common))
    seqlens = torch.tensor([5, 13], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastarch._attention_decode.default, (q[:, :, :2], k, v, seqlens, True, 0.25, -1))


@GPU
@pytest.mark.parametrize("op", ["_attention", "_triton_attention"])
def test_opcheck_gpu_kernel_ops(op):
    """The CUDA kernel ops and the Triton ops on a GPU (the Triton ops' fake test needs a real
    compile: it fails in the interpreter)."""
    q, k, v = qkv(d=64, dtype=torch.float16, device="cuda")
    common = (None, None, None, None, 0, 0, True, 0.125, -1, -1, 0.0, 0)
    fwd, bwd, dec = (getattr(torch.ops.fastarch, f"{op}_{name}") for name in ("fwd", "bwd", "decode"))
    torch.library.opcheck(fwd.default, (q, k, v, *common))
    out, lse = fwd(q, k, v, *common)
    torch.library.opcheck(bwd.default, (torch.randn_like(out), q, k, v, out, lse, *common))
    seqlens = torch.tensor([5, 13], dtype=torch.int32, device="cuda")
    torch.library.opcheck(dec.default, (q[:, :, :2], k, v, seqlens, True, 0.125, -1))
    append = getattr(torch.ops.fastarch, "_append_kv" if op == "_attention" else "_triton_append_kv")
    torch.library.opcheck(append.default, (k.clone(), v.clone(), k[:, :, :2], v[:, :, :2], seqlens))


# ----------------------------------------------------------------------------- torch.compile


def _compare_compiled(fn, *inputs, dynamic=False, grads=True):
    """fn compiled with fullgraph=True against eager: the same outputs (bit for bit: the same
    kernels run) and, through a sum of the outputs, the same gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    results = []
    for f in (fn, compiled):
        xs = [t.detach().clone().requires_grad_(grads and t.is_floating_point()) for t in inputs]
        torch.manual_seed(4)  # the same dropout seed in both runs
        with torch._inductor.config.patch(fallback_random=True):  # (torch's RNG in compiled code too)
            out = f(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        if grads:
            sum(o.float().sum() for o in outs).backward()
        results.append((outs, [x.grad for x in xs if x.requires_grad]))
    (eager, eager_grads), (comp, comp_grads) = results
    for a, b in zip(eager, comp):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for a, b in zip(eager_grads, comp_grads):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# (the masks are made outside the compiled code: inductor may round a linspace differently)
BOOL_MASK = torch.ones(9, 13, dtype=torch.bool).tril(4)
FLOAT_MASK = randn(2, 1, 9, 13, seed=9)
PADDING = torch.arange(13)[None] < torch.tensor([[13], [5]])
COMPILED = {
    "causal-window": lambda q, k, v: ops.attention(q, k, v, causal=True, window=4),
    "window-both": lambda q, k, v: ops.attention(q, k, v, window=(2, 3)),
    "bool-mask": lambda q, k, v: ops.attention(q, k, v, attn_mask=BOOL_MASK),
    "float-mask": lambda q, k, v: ops.attention(q, k, v, attn_mask=FLOAT_MASK),
    "key-padding": lambda q, k, v: ops.attention(q, k, v, key_padding_mask=PADDING),
    "dropout": lambda q, k, v: ops.attention(q, k, v, dropout_p=0.3),  # the seed from torch's default generator
    "lse": lambda q, k, v: ops.attention(q, k, v, causal=True, return_lse=True),
    "sdpa": lambda q, k, v: ops.scaled_dot_product_attention(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), is_causal=True),
}


@pytest.mark.parametrize("name", list(COMPILED))
def test_compile_fullgraph_matches_eager(name):
    _compare_compiled(COMPILED[name], *qkv())


def test_compile_varlen():
    cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 7, 13], dtype=torch.int32)

    def f(q, k, v):
        return ops.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=7, causal=True)

    q, k, v = (t[0].transpose(0, 1).contiguous() for t in qkv())  # (total, H, D)
    _compare_compiled(f, q, k, v)


def test_compile_decode_step_with_append_kv():
    """One decoding step as a model runs it: append the new keys, then attend."""
    k_cache, v_cache = torch.zeros(2, 2, 20, 16), torch.zeros(2, 2, 20, 16)
    seqlens = torch.tensor([3, 9], dtype=torch.int32)
    k_cache[:, :, :9], v_cache[:, :, :9] = randn(2, 2, 9, 16, seed=4), randn(2, 2, 9, 16, seed=5)

    def step(q, k_new, v_new, k_cache, v_cache):
        ops.append_kv(k_cache, v_cache, k_new, v_new, seqlens)
        return ops.attention_decode(q, k_cache, v_cache, seqlens + 1, window=6)

    q, k_new, v_new = randn(2, 4, 1, 16, seed=6), randn(2, 2, 1, 16, seed=7), randn(2, 2, 1, 16, seed=8)
    eager_caches = (k_cache.clone(), v_cache.clone())
    compiled_caches = (k_cache.clone(), v_cache.clone())
    eager = step(q, k_new, v_new, *eager_caches)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(q, k_new, v_new, *compiled_caches)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for a, b in zip(eager_caches, compiled_caches):
        assert torch.equal(a, b)
    assert torch.equal(eager_caches[0][0, :, 3], k_new[0, :, 0])  # written at each sequence's end


@pytest.mark.parametrize("name", ["attention", "sdpa", "layer_norm", "rms_norm"])
def test_compile_dynamic_shapes(name):
    """dynamic=True traces Python floats (eps, scale) as symbols: the ops' checks must not need
    their values while tracing."""
    fns = {
        "attention": lambda q, k, v: ops.attention(q, k, v, causal=True),
        "sdpa": lambda q, k, v: ops.scaled_dot_product_attention(q, k, v),
        "layer_norm": lambda q, k, v: ops.layer_norm(q, k[0, 0, 0], v[0, 0, 0]),
        "rms_norm": lambda q, k, v: ops.rms_norm(q, k[0, 0, 0]),
    }
    for sq, sk in ((9, 13), (11, 17)):
        q, k, v = qkv(hkv=4, sq=sq, sk=sk)
        _compare_compiled(fns[name], q, k, v, dynamic=True)
