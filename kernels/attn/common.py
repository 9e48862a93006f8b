"""What the attention family's Triton kernels share: the forward (forward.py: FlashAttention-2,
online softmax over key blocks), the backward (backward.py: delta = rowsum(dO * O), then a dK/dV
kernel over query blocks and a dQ kernel over key blocks), flash-decoding against a key/value
cache (decode.py: split-K partial results and a combine) and append_kv (append_kv.py). The
semantics are those of fastarch/ops/attn/reference.py.

Shared structure:
- One program owns a tile of rows (queries; keys in the dK/dV kernel) of one head of one
  sequence and loops over the tiles of the other side. Only the tiles that intersect the
  visible band (causal, sliding window, sequence length) are visited, and only those that the
  band cuts (the diagonal ones, the sequence's last one) pay for the element-wise mask:
  _band splits the loop into masked / unmasked / masked ranges.
- Grids are (row tiles, heads, batch); with packed variable lengths the batch axis is the
  sequence n of cu_seqlens and the batch strides are 0 (the 4-D view has B == 1).
- Scores are kept in log2 units: exp2 with log2(e) folded into the scale (and into the additive
  mask); lse is stored in natural units for the interface.
- Grouped-query attention indexes key/value head h // GROUP; the dK/dV kernel loops over the
  GROUP query heads of its key/value head, so dk and dv need no atomics and no partials.
- Dropout recomputes the reference's hash: a query row's first round once per program, the
  key's round per tile (uint32 arithmetic, exactly reference.dropout_hash).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_M32 = 0xFFFFFFFF
# Triton's CPU interpreter (TRITON_INTERPRET=1, for tests without a GPU) holds bf16 as uint16:
# its tl.dot multiplies bf16 operands as integers, and its fp32 -> bf16 casts truncate. The
# kernels then feed tl.dot fp32 operands holding the values the GPU would see (rounded to the
# inputs' dtype by hand), which makes the interpreter compute what the GPU computes.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- shared helpers


@triton.jit
def _round_bf16(x):
    """x (fp32) rounded to nearest even bf16, still held in fp32 (the interpreter's casts truncate)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # NaN and inf survive
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) rounded to dtype for a store, as on the GPU."""
    if INTERPRET and dtype == tl.bfloat16:
        x = _round_bf16(x)  # exact in bf16 now: the interpreter's truncation is harmless
    return x.to(dtype)


@triton.jit
def _operand(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) rounded to the inputs' dtype for tl.dot; in the interpreter kept in fp32."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            return _round_bf16(x)
        return x.to(dtype).to(tl.float32)
    return x.to(dtype)


@triton.jit
def _load_tile(ptr, offs_r, stride_r, offs_c, row_ok, CHECK_ROWS: tl.constexpr, COLS: tl.constexpr,
               BLOCK_C: tl.constexpr, INTERPRET: tl.constexpr):
    """A (rows, BLOCK_C) tile of a row-major matrix, zero outside the rows row_ok and the COLS
    real columns (BLOCK_C is COLS padded to a power of two)."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :]
    if CHECK_ROWS:
        if COLS == BLOCK_C:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & (offs_c[None, :] < COLS), other=0.0)
    else:
        if COLS == BLOCK_C:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_c[None, :] < COLS, other=0.0)
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def _mix32(h):
    """_mix32 of fastarch/ops/attn/reference.py on uint32 (the products wrap modulo 2**32)."""
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x4C7D19F3
    return h ^ (h >> 16)


@triton.jit
def _band(first, last, size, diag, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
          BLOCK: tl.constexpr):
    """Which columns the rows first..last of a tile see, where row i sees column j < size when
    i + diag - left <= j (if HAS_LEFT) and j <= i + diag + right (if HAS_RIGHT).

    Returns 0 <= lo <= full_lo <= full_hi <= hi <= size: [lo, hi) holds every column some row
    sees; the BLOCK-aligned [full_lo, full_hi) only column blocks that every row sees whole (no
    mask); [lo, full_lo) and [full_hi, hi) are the blocks the band cuts. lo is BLOCK-aligned
    too. A tile that sees no column (wholly left of the band: Sq > Sk under causal, a window's
    right side) gets lo == full_lo == full_hi == hi: every loop is empty, none runs over
    negative columns. Rows are those of a sequence of size - diag rows (first < size - diag).
    (Every operand of // is >= 0: the interpreter floors where the GPU truncates.)"""
    lo = 0
    hi = size
    full_lo = 0
    full_hi = size // BLOCK * BLOCK
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(last + diag + right + 1, 0), size)
        full_hi = tl.minimum(tl.maximum(first + diag + right + 1, 0), size) // BLOCK * BLOCK
    if HAS_LEFT:
        lo = tl.maximum(first + diag - left, 0) // BLOCK * BLOCK  # <= hi: first < size - diag
        full_lo = tl.minimum(tl.maximum((tl.maximum(last + diag - left, 0) + BLOCK - 1) // BLOCK * BLOCK, lo), hi)
    if HAS_LEFT or HAS_RIGHT:
        full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _add_mask(s, bias):
    """Scores s (log2 units) plus the additive attn_mask entries bias (natural units). A -inf
    entry masks: the score is -inf even where s is NaN (NaN + -inf is NaN, and a NaN q or k must
    not reach a query through a key its mask hides); that compare and select is all the NaN
    contract adds to a step, and only with an attn_mask."""
    bias = bias.to(tl.float32)
    return tl.where(bias == float("-inf"), float("-inf"), s + bias * 1.4426950408889634)  # log2(e)


@triton.jit
def _visible(i, j, seqlen_q, seqlen_k, diag, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """bool tile: query i sees key j (i, j broadcast against each other)."""
    ok = (i < seqlen_q) & (j < seqlen_k)
    if HAS_RIGHT:
        ok = ok & (j <= i + diag + right)
    if HAS_LEFT:
        ok = ok & (j >= i + diag - left)
    return ok


@triton.jit
def _sequence(CU_Q, CU_K, n, seqlen_q_4d, seqlen_k_4d, VARLEN: tl.constexpr):
    """(first query row, query count, first key row, key count) of sequence n (batch entry n,
    or packed sequence n of cu_seqlens)."""
    if VARLEN:
        q_start = tl.load(CU_Q + n)
        seqlen_q = tl.load(CU_Q + n + 1) - q_start
        k_start = tl.load(CU_K + n)
        seqlen_k = tl.load(CU_K + n + 1) - k_start
    else:
        q_start = 0
        seqlen_q = seqlen_q_4d
        k_start = 0
        seqlen_k = seqlen_k_4d
    return q_start, seqlen_q, k_start, seqlen_k


# ----------------------------------------------------------------------------- launch helpers

_TUNING_KEY = ["HEAD_DIM", "HEAD_DIM_V", "VARLEN", "HAS_LEFT", "HAS_RIGHT", "HAS_MASK", "HAS_KPM", "DROPOUT",
               "seqlen_bucket"]
# The interpreter's tiles (BLOCK_M, BLOCK_N): its time goes per tile operation, so bigger tiles
# run faster; M != N, and dK/dV's transposed to the others', as on the GPU.
INTERPRET_TILES = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32), "decode_n": 32}


# FASTARCH_TRITON_AUTOTUNE=0: every kernel runs the first entry of its table for the head dim,
# with no tuning runs (deterministic tiles, no first-call delay). FORCED_TILES[kernel name]
# (an entry of its table) overrides both, for tests that run every entry; a kernel's
# autotuner caches its choice per key, so clear its ``cache`` after changing it.
AUTOTUNE = os.environ.get("FASTARCH_TRITON_AUTOTUNE", "1") != "0"
FORCED_TILES: dict[str, tuple[int, ...]] = {}


def _autotuned(kernel, table: dict[int, list[tuple[int, ...]]], tiles=("BLOCK_M", "BLOCK_N"), key=None):
    """kernel behind an autotuner over table's entries for its head dim (in the interpreter:
    kernel itself, its tiles given at launch). An entry is the values of ``tiles``, then
    num_warps and num_stages."""
    if INTERPRET:
        return kernel
    configs = {t: triton.Config(dict(zip(tiles, t)), num_warps=t[-2], num_stages=t[-1])
               for entries in table.values() for t in entries}
    name = kernel.__name__

    def for_head_dim(_configs, named_args, **kwargs):
        if name in FORCED_TILES:
            return [configs[FORCED_TILES[name]]]
        args = {**named_args, **kwargs}
        d = max(args["BLOCK_D"], args["BLOCK_DV"])
        entries = table[64 if d <= 64 else 128 if d <= 128 else 256]
        return [configs[t] for t in (entries if AUTOTUNE else entries[:1])]

    return triton.autotune(list(configs.values()), key=key or _TUNING_KEY,
                           prune_configs_by={"early_config_prune": for_head_dim})(kernel)


def _tiles(kernel: str) -> dict[str, int]:
    if not INTERPRET:
        return {}  # the autotuner's
    block_m, block_n = INTERPRET_TILES[kernel]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n)


def _bucket(seqlen: int) -> int:
    return min(triton.next_power_of_2(max(seqlen, 1)), 1 << 14)


def _head_dims(q: Tensor, v: Tensor) -> dict:
    """Head dims and their tiles: padded to a power of two, at least 16 (tl.dot's minimum)."""
    d, dv = int(q.shape[-1]), int(v.shape[-1])  # int: compile-time tiles (specialized when traced)
    return dict(
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INTERPRET=INTERPRET,
    )


def _strides(name: str, t: Tensor, varlen: bool) -> dict[str, int]:
    """stride_<name>b/h/s of a 4-D view; the batch stride 0 for packed sequences (the grid's
    batch axis is then the sequence, and B == 1)."""
    return {f"stride_{name}b": 0 if varlen else t.stride(0), f"stride_{name}h": t.stride(1),
            f"stride_{name}s": t.stride(2)}


def _shared(q, k, args) -> dict:
    """The launch arguments the forward, dK/dV and dQ kernels share: masks, sequence offsets,
    the band, dropout, and the compile-time flags. args: an AttentionArgs
    (fastarch/ops/attn/args.py)."""
    B, H, Sq, _ = q.shape
    varlen = args.cu_seqlens_q is not None
    rights = ([0] if args.causal else []) + ([args.window_right] if args.window_right >= 0 else [])
    absent = q  # any tensor, for a pointer whose flag is off
    shared = dict(
        CU_Q=args.cu_seqlens_q if varlen else absent, CU_K=args.cu_seqlens_k if varlen else absent,
        MASK=absent, stride_mb=0, stride_mh=0, stride_mq=0, stride_mk=0, KPM=absent, stride_kpm=0,
        H=H, GROUP=H // k.shape[1], seqlen_q_4d=Sq, seqlen_k_4d=k.shape[2], qk_scale=args.scale * LOG2E,
        left=max(args.window_left, 0), right=min(rights) if rights else 0,
        seed=args.seed_value & _M32, drop_threshold=min(int(args.dropout_p * 2**32), _M32),
        drop_scale=1.0 / (1.0 - args.dropout_p),
        VARLEN=varlen, HAS_LEFT=args.window_left >= 0, HAS_RIGHT=bool(rights), HAS_MASK=args.attn_mask is not None,
        HAS_KPM=args.key_padding_mask is not None, DROPOUT=args.dropout_p > 0,
    )
    if args.attn_mask is not None:  # (B, H, Sq, Sk), broadcast dims with stride 0
        sb, sh, sq, sk = args.attn_mask.stride()
        shared.update(MASK=args.attn_mask, stride_mb=0 if varlen else sb, stride_mh=sh, stride_mq=sq, stride_mk=sk)
    if args.key_padding_mask is not None:
        shared.update(KPM=args.key_padding_mask.view(torch.uint8),
                      stride_kpm=0 if varlen else args.key_padding_mask.stride(0))
    return shared
