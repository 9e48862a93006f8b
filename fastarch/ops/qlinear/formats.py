"""GGUF's block formats that fastarch.ops.quantized_linear reads, in plain PyTorch: each
format's values (the definition of correct, bit for bit ggml's and gguf-py's dequantization)
and a quantizer that writes it.

A row of W (in_features values) is a run of blocks, each of ``BLOCK_VALUES[quant]`` values in
``BLOCK_BYTES[quant]`` bytes (fp16 fields little-endian):

- Q4_0 (32 values, 18 bytes): d, 16 bytes of 4-bit q (byte j: value j low, value j + 16 high);
  a value is (q - 8) d.
- Q4_1 (32, 20): d, m, the 4-bit q as Q4_0; q d + m.
- Q5_0 (32, 22): d, a u32 whose bit j is value j's fifth bit, the low 4 bits as Q4_0; (q - 16) d.
- Q5_1 (32, 24): d, m, then as Q5_0; q d + m.
- Q8_0 (32, 34): d, 32 int8 q; q d.
- Q4_K (256, 144): d, dmin, 12 bytes of eight 6-bit scales and eight 6-bit mins (``k_scales``),
  128 bytes of 4-bit q: bytes 32p .. 32p + 31 hold sub-block 2p's values low and 2p + 1's high;
  sub-block s's value is (d sc_s) q - (dmin m_s).
- Q5_K (256, 176): d, dmin, the 12 scale bytes, 32 bytes qh (bit s of byte l: the fifth bit of
  sub-block s's value l), then the low 4 bits as Q4_K; the value as Q4_K.
- Q6_K (256, 210): 128 bytes ql (low 4 bits), 64 bytes qh (2 high bits), 16 int8 scales, d; in
  each half of 128 values, value 32g + l (g < 4) takes ql[l + 32 (g % 2)]'s low (g < 2) or high
  nibble and bits 2g, 2g + 1 of qh[l]; value i is (d sc_{i / 16}) (q - 32).
- IQ4_NL (32, 18): d, the 4-bit q as Q4_0; a value is d IQ4_LEVELS[q], 16 non-uniform levels.
- IQ4_XS (256, 136): d, a u16 of the scales' high 2 bits (sub-block s: bits 2s, 2s + 1), 4
  bytes of their low nibbles (sub-block s: byte s / 2, low nibble for even s), then 16 bytes
  per sub-block of 32 as IQ4_NL's; sub-block s's value is (d (ls_s - 32)) IQ4_LEVELS[q].

Every product of fp16 and small integers above is exact in fp32, and where a value is a product
and a sum or difference the product is exact, so computing each in fp32 gives ggml's values bit
for bit; Q6_K's (d sc) (q - 32) rounds once, in that order, as ggml's does (IQ4_XS's
(d (ls - 32)) level is exact: 11 + 6 + 7 bits).
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK_VALUES = {"q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32, "q4_k": 256, "q5_k": 256, "q6_k": 256,
                "iq4_nl": 32, "iq4_xs": 256}
"""Values per block of each format."""
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34, "q4_k": 144, "q5_k": 176, "q6_k": 210,
               "iq4_nl": 18, "iq4_xs": 136}
"""Bytes per block of each format."""
QUANTS = tuple(BLOCK_BYTES)


def row_bytes(in_features: int, quant: str) -> int:
    """The bytes of one W row of ``in_features`` values (a multiple of the format's block)."""
    return in_features // BLOCK_VALUES[quant] * BLOCK_BYTES[quant]


# ---------------------------------------------------------------------------------------------
# Reading blocks: uint8 (n, block bytes) -> float32 values (n, block values).
# ---------------------------------------------------------------------------------------------


def field(blocks: Tensor, start: int, stop: int) -> Tensor:
    """Bytes [start, stop) of every block, contiguous (n, stop - start): torch's elementwise
    ops on a strided uint8 slice with a short inner dim run ~10x slower than on a copy."""
    return blocks[:, start:stop].contiguous()


def f16_at(blocks: Tensor, start: int) -> Tensor:
    """The fp16 at byte ``start`` of every block, as float32 (n, 1)."""
    return field(blocks, start, start + 2).view(torch.float16).float()


def low_high(qs: Tensor) -> Tensor:
    """(..., k) bytes -> (..., 2k) 4-bit values: every low nibble, then every high nibble."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def bit_fields(qh: Tensor, count: int, width: int = 1) -> Tensor:
    """(..., k) bytes -> (..., count, k): field i is (byte >> (i * width)) & mask."""
    shifts = torch.arange(0, count * width, width, dtype=torch.uint8)
    return (qh.unsqueeze(-2) >> shifts.view(count, 1)) & ((1 << width) - 1)


def _five_bit(qh: Tensor, qs: Tensor) -> Tensor:
    """Q5_0/Q5_1 values (n, 32): low nibbles from qs, bit j of the little-endian u32 qh on top."""
    high = bit_fields(qh, 8).transpose(-1, -2).reshape(qh.shape[0], 32)  # byte-major, bit-minor = bit j
    return low_high(qs) | (high << 4)


def q4_0_values(b: Tensor) -> Tensor:
    """Q4_0 blocks (n, 18) -> their values (n, 32) fp32: (q - 8) * d."""
    q = low_high(field(b, 2, 18)).to(torch.int8) - 8
    return f16_at(b, 0) * q.float()


def q4_1_values(b: Tensor) -> Tensor:
    """Q4_1 blocks (n, 20) -> their values (n, 32) fp32: q * d + m."""
    return f16_at(b, 0) * low_high(field(b, 4, 20)).float() + f16_at(b, 2)


def q5_0_values(b: Tensor) -> Tensor:
    """Q5_0 blocks (n, 22) -> their values (n, 32) fp32: (q - 16) * d."""
    q = _five_bit(field(b, 2, 6), field(b, 6, 22)).to(torch.int8) - 16
    return f16_at(b, 0) * q.float()


def q5_1_values(b: Tensor) -> Tensor:
    """Q5_1 blocks (n, 24) -> their values (n, 32) fp32: q * d + m."""
    return f16_at(b, 0) * _five_bit(field(b, 4, 8), field(b, 8, 24)).float() + f16_at(b, 2)


def q8_0_values(b: Tensor) -> Tensor:
    """Q8_0 blocks (n, 34) -> their values (n, 32) fp32: q * d."""
    return field(b, 2, 34).view(torch.int8).float() * f16_at(b, 0)


def k_scales(s: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K's 12 scale bytes (n, 12) -> eight 6-bit scales and eight 6-bit mins, each
    (n, 8): sub-block j < 4 takes the low 6 bits of byte j (scale) and j + 4 (min); j >= 4 the
    nibbles of byte j + 4 (scale low, min high) under the top 2 bits of bytes j - 4 and j."""
    d, m, md = (field(s, i, i + 4) for i in (0, 4, 8))
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _k_scaled(b: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K's per-sub-block d * sc and dmin * m, each (n, 8, 1) fp32 (exact)."""
    n = b.shape[0]
    sc, mn = k_scales(field(b, 4, 16))
    return (f16_at(b, 0) * sc.float()).view(n, 8, 1), (f16_at(b, 2) * mn.float()).view(n, 8, 1)


def q4_k_values(b: Tensor) -> Tensor:
    """Q4_K blocks (n, 144) -> their values (n, 256) fp32: (d sc) q - (dmin m)."""
    n = b.shape[0]
    d, dm = _k_scaled(b)
    q = low_high(field(b, 16, 144).reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (d * q - dm).view(n, 256)


def q5_k_values(b: Tensor) -> Tensor:
    """Q5_K blocks (n, 176) -> their values (n, 256) fp32: (d sc) q - (dmin m)."""
    n = b.shape[0]
    d, dm = _k_scaled(b)
    ql = low_high(field(b, 48, 176).reshape(n, 4, 32)).reshape(n, 8, 32)
    qh = bit_fields(field(b, 16, 48), 8)  # bit s of qh[l] is the fifth bit of sub-block s's value l
    return (d * (ql | (qh << 4)).float() - dm).view(n, 256)


def q6_k_values(b: Tensor) -> Tensor:
    """Q6_K blocks (n, 210) -> their values (n, 256) fp32: (d sc) (q - 32)."""
    n = b.shape[0]
    d = (f16_at(b, 208) * field(b, 192, 208).view(torch.int8).float()).view(n, 16, 1)
    ql = low_high(field(b, 0, 128).reshape(n, 2, 64)).reshape(n, 8, 32)
    qh = bit_fields(field(b, 128, 192).reshape(n, 2, 32), 4, 2).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    return (d * q.view(n, 16, 16).float()).view(n, 256)


IQ4_LEVELS = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                          dtype=torch.float32)
"""IQ4_NL's and IQ4_XS's 16 levels (llama.cpp's kvalues_iq4nl), denser near zero where weights are."""


def iq4_nl_values(b: Tensor) -> Tensor:
    """IQ4_NL blocks (n, 18) -> their values (n, 32) fp32: d * level[q]."""
    return f16_at(b, 0) * IQ4_LEVELS[low_high(field(b, 2, 18)).long()]


def iq4_xs_values(b: Tensor) -> Tensor:
    """IQ4_XS blocks (n, 136) -> their values (n, 256) fp32: (d (ls - 32)) level[q]."""
    n = b.shape[0]
    sl = field(b, 4, 8)
    low = torch.stack([sl & 0x0F, sl >> 4], dim=2).reshape(n, 8)  # sub-block 2j: low nibble of byte j
    high = bit_fields(field(b, 2, 4), 4, 2).transpose(1, 2).reshape(n, 8)  # bits 2s, 2s + 1 of the u16
    dl = (f16_at(b, 0) * ((low | (high << 4)).to(torch.int8) - 32).float()).view(n, 8, 1)
    return (dl * IQ4_LEVELS[low_high(field(b, 8, 136).reshape(n, 8, 16)).long()]).view(n, 256)


def widen_to_q8_0(blocks: Tensor, quant: str) -> Tensor:
    """Q4_0 or Q5_0 (or Q8_0) blocks (n, bytes per row) as Q8_0 blocks holding the same values
    bit for bit: d kept, q - 8 (q - 16) as int8, and Q8_0's q d is the same product. For a
    stack of layers in mixed formats (a Q4_K_M file of narrow rows stores q and k in Q5_0, v
    in Q8_0), which one op call must read in one format."""
    if quant not in ("q4_0", "q5_0", "q8_0"):
        raise ValueError(f"widen_to_q8_0: {quant} values are not all q d with one d per 32 (q4_0, q5_0 or q8_0 are)")
    if quant == "q8_0":
        return blocks
    n = blocks.shape[0]
    b = blocks.reshape(-1, BLOCK_BYTES[quant])
    if quant == "q4_0":
        q = low_high(field(b, 2, 18)).to(torch.int8) - 8
    else:
        q = _five_bit(field(b, 2, 6), field(b, 6, 22)).to(torch.int8) - 16
    return torch.cat([field(b, 0, 2), q.view(torch.uint8)], 1).reshape(n, -1)


VALUES = {
    "q4_0": q4_0_values, "q4_1": q4_1_values, "q5_0": q5_0_values, "q5_1": q5_1_values, "q8_0": q8_0_values,
    "q4_k": q4_k_values, "q5_k": q5_k_values, "q6_k": q6_k_values, "iq4_nl": iq4_nl_values, "iq4_xs": iq4_xs_values,
}


def dequantize_blocks(blocks: Tensor, quant: str) -> Tensor:
    """W's values (out_features, in_features) fp32 from its blocks (out_features, bytes per
    row) uint8 of format ``quant`` (a QUANTS key)."""
    n, nbytes = blocks.shape
    per = BLOCK_BYTES[quant]
    values = VALUES[quant](blocks.reshape(-1, per))
    return values.reshape(n, nbytes // per * BLOCK_VALUES[quant])


# ---------------------------------------------------------------------------------------------
# Writing blocks: the nearest levels. Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 as llama.cpp's reference
# quantizer and gguf-py (bit for bit); the k-quants by a plain rule (each sub-block's range,
# its scale and min rounded to 6 bits, or Q6_K's to 8), and the IQ4 formats by the nearest of
# their levels under the block's largest magnitude: not llama.cpp's search for the scales of
# least error, so its bytes differ from llama-quantize's, which any reader takes alike.
# ---------------------------------------------------------------------------------------------


def _pack_nibbles(q: Tensor) -> Tensor:
    """(n, 2k) values < 16 -> (n, k) bytes: value j low, value j + k high."""
    k = q.shape[1] // 2
    return (q[:, :k] & 0x0F) | (q[:, k:] << 4)


def _pack_bits(bits: Tensor) -> Tensor:
    """(n, 8k) of 0/1 -> (n, k) bytes, bit i of byte j = bits[8 j + i]."""
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (bits.view(bits.shape[0], -1, 8) * weights).sum(-1, dtype=torch.uint8)


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d != 0, 1 / d, torch.zeros_like(d))


def _half_bytes(*values: Tensor) -> Tensor:
    return torch.cat([v.half() for v in values], 1).view(torch.uint8)


def _legacy(v: Tensor, quant: str) -> Tensor:
    """Blocks (n, 32) -> Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 bytes, as gguf-py's quantize."""
    if quant in ("q4_1", "q5_1"):
        top = 15 if quant == "q4_1" else 31
        lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
        d = (hi - lo) / top
        q = ((v - lo) * _inverse(d) + 0.5).floor().clamp(0, top).to(torch.uint8)
        head = _half_bytes(d, lo)
    elif quant == "q8_0":
        d = v.abs().amax(1, keepdim=True) / 127
        body = (v * _inverse(d)).round().clamp(-127, 127).to(torch.int8).view(torch.uint8)
        return torch.cat([_half_bytes(d), body], 1)
    else:  # the signed value of largest magnitude maps to level 0 (-8 d, -16 d)
        half = 8 if quant == "q4_0" else 16
        d = v.gather(1, v.abs().argmax(1, keepdim=True)) / -half
        q = (v * _inverse(d) + (half + 0.5)).floor().clamp(0, 2 * half - 1).to(torch.uint8)
        head = _half_bytes(d)
    if quant in ("q5_0", "q5_1"):
        head = torch.cat([head, _pack_bits(q >> 4)], 1)
    return torch.cat([head, _pack_nibbles(q)], 1)


def _six_bit(scale: Tensor, top: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sub-block non-negative scales (n, s) -> the super-block's fp16 step (n, 1) and the
    6-bit multiples of it nearest each scale (n, s) uint8."""
    d = (top / 63).half().float()
    return d, (scale * _inverse(d)).round().clamp(0, 63).to(torch.uint8)


def _k_quant(v: Tensor, quant: str) -> Tensor:
    """Blocks (n, 256) -> Q4_K/Q5_K bytes."""
    n = v.shape[0]
    top = 15 if quant == "q4_k" else 31
    sub = v.view(n, 8, 32)
    lo = sub.amin(2).clamp(max=0)  # a sub-block's offset -m (never above 0, as ggml's)
    scale = (sub.amax(2) - lo) / top
    d, sc = _six_bit(scale, scale.amax(1, keepdim=True))
    dmin, mn = _six_bit(-lo, (-lo).amax(1, keepdim=True))
    step, offset = (d * sc.float()).unsqueeze(2), (dmin * mn.float()).unsqueeze(2)
    q = ((sub + offset) * _inverse(step)).round().clamp(0, top).to(torch.uint8)  # (n, 8, 32)
    scales = torch.cat([
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6), (sc[:, 4:] & 0x0F) | (mn[:, 4:] << 4),
    ], 1)
    pairs = q.view(n, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 0x0F) | ((pairs[:, :, 1] & 0x0F) << 4)).reshape(n, 128)
    parts = [_half_bytes(d, dmin), scales]
    if quant == "q5_k":
        parts.append(_pack_bits((q >> 4).permute(0, 2, 1).reshape(n, 256)))  # byte l: bit s = sub-block s's
    return torch.cat([*parts, qs], 1)


def _q6_k(v: Tensor) -> Tensor:
    """Blocks (n, 256) -> Q6_K bytes."""
    n = v.shape[0]
    sub = v.view(n, 16, 16)
    big = sub.gather(2, sub.abs().argmax(2, keepdim=True)).squeeze(2)  # maps to level -32
    scale = big / -32
    d = (scale.abs().amax(1, keepdim=True) / 127).half().float()
    sc = (scale * _inverse(d)).round().clamp(-127, 127)
    step = (d * sc).unsqueeze(2)
    q = ((sub * _inverse(step)).round() + 32).clamp(0, 63).to(torch.uint8).view(n, 2, 4, 32)  # (half, g, l)
    low = torch.cat([(q[:, :, 0] & 0x0F) | (q[:, :, 2] << 4), (q[:, :, 1] & 0x0F) | (q[:, :, 3] << 4)], 2)
    high = q >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return torch.cat([low.reshape(n, 128), qh.reshape(n, 64), sc.to(torch.int8).view(torch.uint8), _half_bytes(d)], 1)


def _nearest_level(v: Tensor, step: Tensor) -> Tensor:
    """The index of the IQ4 level nearest each v / step (step 0: level 8, the one nearest 0), uint8."""
    return (v * _inverse(step)).unsqueeze(-1).sub(IQ4_LEVELS).abs().argmin(-1).to(torch.uint8)


def _iq4(v: Tensor, quant: str) -> Tensor:
    """Blocks (n, 32) -> IQ4_NL bytes, (n, 256) -> IQ4_XS bytes: the value of largest magnitude
    maps to level -127 (its sub-block's step; IQ4_XS's steps rounded to 6-bit multiples of d)."""
    n = v.shape[0]
    sub = v.view(n, -1, 32)
    big = sub.gather(2, sub.abs().argmax(2, keepdim=True)).squeeze(2)
    if quant == "iq4_nl":
        d = (big / -127).half().float()
        return torch.cat([_half_bytes(d), _pack_nibbles(_nearest_level(v, d))], 1)
    scale = big / -127
    d = (scale.abs().amax(1, keepdim=True) / 32).half().float()
    ls = ((scale * _inverse(d)).round() + 32).clamp(0, 63).to(torch.uint8)  # (n, 8)
    q = _nearest_level(sub, (d * (ls.float() - 32)).unsqueeze(2))  # (n, 8, 32)
    high = (ls >> 4).long() << torch.arange(0, 16, 2)
    scales_h = high.sum(1, keepdim=True).to(torch.int16).view(torch.uint8)  # the u16, little-endian
    scales_l = (ls[:, 0::2] & 0x0F) | (ls[:, 1::2] << 4)
    qs = _pack_nibbles(q.reshape(n * 8, 32)).reshape(n, 128)
    return torch.cat([_half_bytes(d), scales_h, scales_l, qs], 1)


def quantize_blocks(w: Tensor, quant: str) -> Tensor:
    """The blocks of w (out_features, in_features), in_features a multiple of the format's
    block, in format ``quant``: the nearest levels (see above). For tests and for weights that
    did not come quantized; dequantize_blocks gives the values the blocks hold."""
    if quant not in BLOCK_BYTES:
        raise ValueError(f"quantize_blocks: quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    block = BLOCK_VALUES[quant]
    if w.dim() != 2 or w.shape[1] % block:
        raise ValueError(f"quantize_blocks: w must be (out_features, in_features) with in_features a multiple of "
                         f"{block} ({quant}'s block), got shape {tuple(w.shape)}")
    v = w.detach().float().cpu().reshape(-1, block)
    if quant.startswith("iq4"):
        blocks = _iq4(v, quant)
    elif quant == "q6_k":
        blocks = _q6_k(v)
    elif block == 256:
        blocks = _k_quant(v, quant)
    else:
        blocks = _legacy(v, quant)
    return blocks.reshape(w.shape[0], -1).contiguous()
