"""fastarch.ops.linear against torch's F.linear at the row counts of decoding, side by side in
one run of interleaved rounds (fastarch.bench.timing.measure), on a decoder's worth of weights
(SmolLM2-135M's 30 layers of projections and its 49152-row head: ~540 MB in fp32, more than
any cache, as in a real decode step). Each row: our kernel called directly (the cpu backend's,
or with ``--device cuda`` the cuda and triton backends'; also at row counts where the registry
sends the call to PyTorch), torch, their ratio, GB/s of weights and the fraction of the
measured copy bandwidth.
The measurements behind fastarch.ops.linear.backends.CPU_ROWS.

    python bench/linear_rows.py [--threads 2] [--rounds 5] [--rows 1,2,4,8,16,32] [--dtype fp32,bf16,fp16]
    python bench/linear_rows.py --device cuda --json out.json
    python bench/linear_rows.py --device cuda --cuda-graphs   # the GPU's time alone (CUDA graph replays)
    python bench/linear_rows.py --widened [--rows 8,16,24,32,48,64,128,512] [--dtype bf16,fp16]
    python bench/linear_rows.py --quantized q4_1,q8_0 [--rows 1,8] [--dtype fp32,bf16]
    python bench/linear_rows.py --quantized q4_k,q5_0,q6_k --layer 1b [--rows 1,8]

--widened: for 16-bit weights on the CPU, the products of more rows, on one layer's projections
(the four of a SmolLM2 layer, in cache as in a prefill): the AVX2 kernel, the same product
widened to fp32 on PyTorch's fp32 GEMM (backends.widened_linear) and PyTorch's own 16-bit
F.linear, their GFLOP/s, side by side. The measurements behind CPU_ROWS["avx2"]'s 16-bit rows
and WIDENED_DTYPES.

--quantized: fastarch.ops.quantized_linear on the same decoder's weights held as GGUF blocks of
each format (the kernel of the backend the registry picks, called directly), against our dense
kernel and F.linear on the dense weights of the dtype: ms per pass over every weight, the
blocks' GB/s and fraction of the copy bandwidth; on the CPU also the blocks with x rounded to int8
(activations="int8", llama.cpp's arithmetic: "int8 ms", and its speed over the exact blocks'). ``--layer 1b``: 4 layers of a 1B-class
decoder's projections (hidden 2048, intermediate 8192, GQA 8 of 32 heads: ~1 GB in fp32) and no
head, for the k-quants, whose 256-value super-blocks SmolLM2's 576-wide rows do not hold;
``--layer smollm2-one`` / ``1b-one``: one such layer, for a prefill's many rows (``--rows 64,512``:
then the products' arithmetic, "int8 GF/s" beside the blocks' and F.linear's in the JSON).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from fastarch import _extension, registry
from fastarch.bench import report
from fastarch.bench.timing import copy_bandwidth, measure, set_cuda_graphs, speedup

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (out_features, in_features) of one SmolLM2-135M layer: qkv, o, gate+up, down
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS, HEAD = 30, (49152, 576)
LAYER_1B = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]  # --layer 1b: 4 such layers, no head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--dtype", default="fp32,bf16,fp16")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", default="")
    ap.add_argument("--widened", action="store_true", help="16-bit products of more rows: kernel, widened, F.linear")
    ap.add_argument("--quantized", default="", help="formats (q4_0,q4_1,q8_0): quantized_linear against dense")
    ap.add_argument("--layer", choices=["smollm2", "1b", "smollm2-one", "1b-one"], default="smollm2",
                    help="--quantized: SmolLM2-135M's layers and head, or 4 layers of a 1B-class decoder;"
                         " -one: one such layer (a prefill's working set)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="--device cuda: time each batch as a CUDA graph replay (the GPU's time alone, no host time)")
    a = ap.parse_args()
    if a.cuda_graphs and a.device != "cuda":
        ap.error("--cuda-graphs applies to --device cuda")
    set_cuda_graphs(a.cuda_graphs)
    torch.set_num_threads(a.threads)
    if a.widened:
        return widened(a)
    if a.quantized:
        return quantized(a)
    device = a.device
    bandwidth = copy_bandwidth(device) * 1e9  # bytes/s
    machine = {"cpu": report._cpu_model(), "threads": a.threads, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
               "path": _extension.cpu_path(), "copy_bandwidth_gbs": bandwidth / 1e9,
               "date": time.strftime("%Y-%m-%d"), "cuda_graphs": a.cuda_graphs}
    where = machine["gpu"] if device == "cuda" else f"CPU: {machine['cpu']}; {a.threads} threads; {machine['path']}"
    print(f"{where}; torch {torch.__version__}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    backends = ["cuda", "triton"] if device == "cuda" else ["cpu"]
    print(f"{'dtype':<5} {'rows':>4} {'backend':<7} {'ours ms':>8} {'torch ms':>9} {'vs torch':>8} {'ours GB/s':>9}"
          f" {'torch GB/s':>10} {'ours/copy bw':>12}")
    results = []
    for name in a.dtype.split(","):
        dtype = DTYPES[name]
        g = torch.Generator().manual_seed(0)
        weights = [torch.randn(o, i, generator=g).to(dtype).to(device) for _ in range(LAYERS) for o, i in LAYER]
        weights.append(torch.randn(*HEAD, generator=g).to(dtype).to(device))
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        for rows in map(int, a.rows.split(",")):
            xs = {k: torch.randn(rows, k, generator=g).to(dtype).to(device) for k in {w.shape[1] for w in weights}}
            for backend in backends:
                kernel = next(b for b in registry.backends_of("linear") if b.name == backend).forward

                def ours(kernel=kernel):
                    for w in weights:
                        kernel(xs[w.shape[1]], w, None)

                def theirs():
                    for w in weights:
                        F.linear(xs[w.shape[1]], w)

                times, errors = measure({"ours": ours, "torch": theirs}, device, a.rounds, memory=False)
                if errors:
                    print(name, rows, backend, errors)
                    continue
                t_ours, t_torch = times["ours"].seconds, times["torch"].seconds
                row = {"dtype": name, "rows": rows, "backend": backend, "ours_ms": t_ours * 1e3,
                       "torch_ms": t_torch * 1e3, "vs_torch": speedup(times["torch"], times["ours"]),
                       "ours_gbs": nbytes / t_ours / 1e9, "torch_gbs": nbytes / t_torch / 1e9,
                       "ours_fraction_of_copy": nbytes / t_ours / bandwidth}
                results.append(row)
                print(f"{name:<5} {rows:>4} {backend:<7} {row['ours_ms']:>8.1f} {row['torch_ms']:>9.1f}"
                      f" {row['vs_torch']:>7.2f}x {row['ours_gbs']:>9.1f} {row['torch_gbs']:>10.1f}"
                      f" {row['ours_fraction_of_copy']:>12.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "weights_mb": nbytes / 1e6, "rows": results}, f, indent=1)


def widened(a) -> None:
    """The --widened comparison (see the module docstring)."""
    from fastarch.ops.linear import cpp
    from fastarch.ops.linear.backends import widened_linear

    machine = report.cpu_script_machine(a.threads)
    print(f"{'dtype':<5} {'rows':>4} {'kernel ms':>9} {'widened ms':>10} {'F.linear ms':>11} {'kernel GF/s':>11}"
          f" {'widened GF/s':>12} {'F.linear GF/s':>13}")
    results = []
    g = torch.Generator().manual_seed(0)
    for name in a.dtype.split(","):
        dtype = DTYPES[name]
        if dtype == torch.float32:
            continue
        weights = [torch.randn(o, i, generator=g).to(dtype) for o, i in LAYER]
        for rows in map(int, a.rows.split(",")):
            xs = {k: torch.randn(rows, k, generator=g).to(dtype) for k in {w.shape[1] for w in weights}}
            flop = sum(2 * rows * w.shape[0] * w.shape[1] for w in weights)
            cases = {"kernel": cpp.forward, "widened": widened_linear, "F.linear": F.linear}
            fns = {case: (lambda f=f: [f(xs[w.shape[1]], w, None) for w in weights]) for case, f in cases.items()}
            times, errors = measure(fns, "cpu", a.rounds, memory=False)
            if errors:
                print(name, rows, errors)
                continue
            row = {"dtype": name, "rows": rows, **{f"{c}_ms": times[c].seconds * 1e3 for c in cases},
                   **{f"{c}_gflops": flop / times[c].seconds / 1e9 for c in cases}}
            results.append(row)
            print(f"{name:<5} {rows:>4} {row['kernel_ms']:>9.3f} {row['widened_ms']:>10.3f} {row['F.linear_ms']:>11.3f}"
                  f" {row['kernel_gflops']:>11.1f} {row['widened_gflops']:>12.1f} {row['F.linear_gflops']:>13.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "layer": LAYER, "rows": results}, f, indent=1)


def quantized(a) -> None:
    from fastarch.ops.qlinear import quantize_blocks
    from fastarch.ops.qlinear.backends import QuantizedLinearProblem

    device = a.device
    bandwidth = copy_bandwidth(device) * 1e9
    machine = {"cpu": report._cpu_model(), "threads": a.threads, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
               "path": _extension.cpu_path(), "copy_bandwidth_gbs": bandwidth / 1e9, "date": time.strftime("%Y-%m-%d"),
               "cuda_graphs": a.cuda_graphs}
    print(f"{machine['gpu'] or machine['cpu']}; {a.threads} threads; torch {torch.__version__}; copy bandwidth"
          f" {bandwidth / 1e9:.1f} GB/s")
    print(f"{'dtype':<5} {'quant':<5} {'rows':>4} {'backend':<9} {'blocks ms':>9} {'dense ms':>9} {'F.linear ms':>11}"
          f" {'vs dense':>8} {'vs F.linear':>11} {'blocks GB/s':>11} {'/copy bw':>8} {'int8 ms':>8} {'int8 vs blocks':>14}"
          f" {'int8 GF/s':>10}")
    g = torch.Generator().manual_seed(0)
    if a.layer.endswith("-one"):
        dense32 = [torch.randn(o, i, generator=g) / i**0.5 for o, i in (LAYER_1B if a.layer == "1b-one" else LAYER)]
    elif a.layer == "1b":
        dense32 = [torch.randn(o, i, generator=g) / i**0.5 for _ in range(4) for o, i in LAYER_1B]
    else:
        dense32 = [torch.randn(o, i, generator=g) / i**0.5 for _ in range(LAYERS) for o, i in LAYER]
        dense32.append(torch.randn(*HEAD, generator=g) / HEAD[1] ** 0.5)
    machine["layer"] = a.layer
    if device == "cpu":  # how "int8 ms" multiplies (FASTARCH_CPU_INT8; csrc/cpu/isa.h, Int8Products)
        machine["int8_products"] = _extension.build_info().get("cpu_int8_products")
    results = []
    for quant in a.quantized.split(","):
        blocks = [quantize_blocks(w, quant).to(device) for w in dense32]
        nbytes = sum(b.numel() for b in blocks)
        for name in a.dtype.split(","):
            dtype = DTYPES[name]
            dense = [w.to(dtype).to(device) for w in dense32]
            for rows in map(int, a.rows.split(",")):
                xs = {k: torch.randn(rows, k, generator=g).to(dtype).to(device) for k in {w.shape[1] for w in dense}}
                problem = QuantizedLinearProblem.of(xs[dense[0].shape[1]], blocks[0], quant)
                backend = registry.choose("quantized_linear", problem)  # its kernel, called directly
                dense_backend = next(b for b in registry.backends_of("linear") if b.name == ("cpu" if device == "cpu"
                                                                                               else "cuda"))

                def ours(kernel=backend.forward):
                    for b, w in zip(blocks, dense):
                        kernel(xs[w.shape[1]], b, quant, None)

                def ours_int8(kernel=backend.forward):
                    for b, w in zip(blocks, dense):
                        kernel(xs[w.shape[1]], b, quant, None, "int8")

                def ours_dense(kernel=dense_backend.forward):
                    for w in dense:
                        kernel(xs[w.shape[1]], w, None)

                def theirs():
                    for w in dense:
                        F.linear(xs[w.shape[1]], w)

                contenders = {"blocks": ours, "dense": ours_dense, "torch": theirs}
                if backend.name == "cpu":  # (activations "int8": the CPU kernel)
                    contenders["int8"] = ours_int8
                times, errors = measure(contenders, device, a.rounds, memory=False)
                if errors:
                    print(name, quant, rows, errors)
                    continue
                t = {k: v.seconds for k, v in times.items()}
                flop = sum(2 * rows * w.numel() for w in dense)
                row = {"dtype": name, "quant": quant, "rows": rows, "backend": backend.name,
                       "blocks_gflops": flop / t["blocks"] / 1e9, "torch_gflops": flop / t["torch"] / 1e9,
                       "blocks_ms": t["blocks"] * 1e3, "dense_ms": t["dense"] * 1e3, "torch_ms": t["torch"] * 1e3,
                       "vs_dense": speedup(times["dense"], times["blocks"]),
                       "vs_torch": speedup(times["torch"], times["blocks"]),
                       "blocks_gbs": nbytes / t["blocks"] / 1e9, "blocks_fraction_of_copy": nbytes / t["blocks"] / bandwidth}
                if "int8" in t:
                    row["int8_ms"], row["int8_vs_blocks"] = t["int8"] * 1e3, speedup(times["blocks"], times["int8"])
                    row["int8_gflops"] = flop / t["int8"] / 1e9
                results.append(row)
                int8 = (f" {row['int8_ms']:>8.2f} {row['int8_vs_blocks']:>13.2f}x {row['int8_gflops']:>10.0f}"
                        if "int8" in t else "")
                print(f"{name:<5} {quant:<5} {rows:>4} {backend.name:<9} {row['blocks_ms']:>9.2f} {row['dense_ms']:>9.2f}"
                      f" {row['torch_ms']:>11.2f} {row['vs_dense']:>7.2f}x {row['vs_torch']:>10.2f}x"
                      f" {row['blocks_gbs']:>11.1f} {row['blocks_fraction_of_copy']:>8.2f}{int8}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
