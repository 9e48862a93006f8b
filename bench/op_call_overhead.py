"""What one eager call of each public op costs at a tiny shape (so the kernel is ~1 us and the
rest is the Python around it), against the PyTorch call that does the same work, side by side
in one run. The time that matters when a user calls fastarch.ops / fastarch.nn in a decode loop.

    python bench/op_call_overhead.py [--grad] [--json out.json]

--grad: the inputs require grad (the forward only is timed: what a training step's forward pays
per op). Each figure is the best of 7 rounds of 2000 calls, in microseconds per call.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as TF

import fastarch
import fastarch.ops as F
from fastarch.bench import report


def per_call_us(fn, calls: int = 2000, rounds: int = 7) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def cases(grad: bool):
    g = torch.Generator().manual_seed(0)

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    x, w, b = t(1, 576), t(576), t(576)
    gate, up = t(1, 1536), t(1, 1536)
    xb = t(1, 3072)
    bias = t(3072)
    q, k = t(1, 9, 1, 64), t(1, 3, 1, 64)
    cos, sin = torch.randn(128, 32, generator=g), torch.randn(128, 32, generator=g)
    pos = torch.tensor([5])
    img, gw, gb = t(1, 32, 4, 4), t(32), t(32)
    lw, lb = t(64, 576), t(64)
    qa, ka, va = t(1, 2, 8, 32), t(1, 2, 8, 32), t(1, 2, 8, 32)
    kc, vc = torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)
    seqlens = torch.tensor([6], dtype=torch.int32)
    kn, vn = torch.randn(1, 3, 1, 64, generator=g), torch.randn(1, 3, 1, 64, generator=g)
    qd = torch.randn(1, 9, 1, 64, generator=g)

    def rotate_half(t):
        h = t.shape[-1] // 2
        return torch.cat((-t[..., h:], t[..., :h]), dim=-1)

    def torch_rotary():
        c = torch.cat((cos[5:6], cos[5:6]), -1)
        s = torch.cat((sin[5:6], sin[5:6]), -1)
        return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s

    def torch_append():
        kc[:, :, 6:7] = kn
        vc[:, :, 6:7] = vn

    kv = torch.arange(64) < 7
    yield "layer_norm", lambda: F.layer_norm(x, w, b), lambda: TF.layer_norm(x, (576,), w, b)
    yield "rms_norm", lambda: F.rms_norm(x, w, 1e-5), lambda: TF.rms_norm(x, (576,), w, 1e-5)
    yield "add_rms_norm", lambda: F.add_rms_norm(x, x, w, 1e-5), lambda: TF.rms_norm(x + x, (576,), w, 1e-5)
    yield "swiglu", lambda: F.swiglu(gate, up), lambda: TF.silu(gate) * up
    yield "bias_gelu", lambda: F.bias_gelu(xb, bias, "tanh"), lambda: TF.gelu(xb + bias, approximate="tanh")
    yield "rotary", lambda: F.rotary(q, k, cos, sin, pos), torch_rotary
    yield "group_norm", lambda: F.group_norm(img, 8, gw, gb), lambda: TF.group_norm(img, 8, gw, gb)
    yield "linear", lambda: F.linear(x, lw, lb), lambda: TF.linear(x, lw, lb)
    yield "attention", lambda: F.attention(qa, ka, va, causal=True), lambda: TF.scaled_dot_product_attention(
        qa, ka, va, is_causal=True)
    if not grad:
        yield "attention_decode", lambda: F.attention_decode(qd, kc, vc, seqlens), lambda: (
            TF.scaled_dot_product_attention(qd, kc, vc, attn_mask=kv.view(1, 1, 1, 64), enable_gqa=True))
        yield "append_kv", lambda: F.append_kv(kc, vc, kn, vn, seqlens), torch_append


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grad", action="store_true", help="inputs require grad (forward timed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with torch.set_grad_enabled(args.grad):
        for name, ours, theirs in cases(args.grad):
            a, b = per_call_us(ours), per_call_us(theirs)
            rows.append({"op": name, "fastarch_us": round(a, 2), "torch_us": round(b, 2)})
            print(f"{name:18s} fastarch {a:6.2f} us   torch {b:6.2f} us   ours/torch {a / b:5.2f}", flush=True)
    if args.json:
        meta = {"cpu": report._cpu_model(), "torch": torch.__version__,
                "fastarch": fastarch.__version__, "threads": args.threads, "grad": args.grad,
                "date": time.strftime("%Y-%m-%d")}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
