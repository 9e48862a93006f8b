"""cos/sin tables for fastarch.ops.rotary, with Hugging Face's rope_scaling variants.

The inverse frequencies follow transformers' modeling_rope_utils (default, linear, dynamic,
llama3, yarn) step for step in fp32, and the tables are what its rotary embeddings compute:
angle = position * inv_freq in fp32, then cos and sin times the attention factor. So a model
built on these tables sees the numbers its Hugging Face twin sees.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fastarch.finite import finite_number

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _need(scaling: dict, key: str, rope_type: str) -> Any:
    """rope_scaling[key], which every rope type that reads it needs: a finite number > 0 (a
    factor, a frequency factor or a context length)."""
    if scaling.get(key) is None:
        raise ValueError(f"fastarch.rotary_tables: rope_scaling of rope_type {rope_type!r} needs {key!r}")
    return _positive(scaling, key)


def _positive(scaling: dict, key: str) -> float:
    value = scaling[key]
    if not finite_number(value) or not value > 0:
        raise ValueError(f"fastarch.rotary_tables: rope_scaling[{key!r}] must be a finite number > 0, got {value!r}")
    return value


def _base_inv_freq(dim: int, base: float, device) -> Tensor:
    """inv_freq[i] = 1 / base^(2i / dim), in fp32 as transformers computes it."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / dim
    return 1.0 / (base**exponents)


def _llama3(inv_freq: Tensor, scaling: dict) -> Tensor:
    """Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth blend between."""
    factor = _need(scaling, "factor", "llama3")
    low = _need(scaling, "low_freq_factor", "llama3")
    high = _need(scaling, "high_freq_factor", "llama3")
    original = _need(scaling, "original_max_position_embeddings", "llama3")
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(dim: int, base: float, scaling: dict, device) -> tuple[Tensor, float]:
    """YaRN: interpolated (divided by factor) frequencies for the long wavelengths, the original
    ones for the short, a linear ramp between; and the attention factor 0.1 ln(factor) + 1."""
    original = _need(scaling, "original_max_position_embeddings", "yarn")
    if scaling.get("factor") is None:  # DeepSeek-V3's configs: the ratio of the context lengths
        factor = _need(scaling, "max_position_embeddings", "yarn") / original
    else:
        factor = _positive(scaling, "factor")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the channel whose wavelength fits `rotations` times into the original context
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: the original frequency, 0: the interpolated one
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def inverse_frequencies(
    dim: int, base: float = 10000.0, rope_scaling: dict | None = None, seq_len: int | None = None, device=None
) -> tuple[Tensor, float]:
    """(inv_freq (dim / 2,) fp32, attention_factor) for rotary dim ``dim`` (see rotary_tables)."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"fastarch.rotary_tables: dim (the rotary dim) must be an even int >= 2, got {dim!r}")
    if not finite_number(base) or not base > 1:
        raise ValueError(f"fastarch.rotary_tables: base must be a finite number > 1, got {base!r}")
    if rope_scaling is not None and not isinstance(rope_scaling, dict):
        raise TypeError(f"fastarch.rotary_tables: rope_scaling must be a dict or None, got {type(rope_scaling).__name__}")
    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"fastarch.rotary_tables: rope_type must be one of {', '.join(ROPE_TYPES)}, got {rope_type!r}")
    if rope_type == "yarn":
        return _yarn(dim, base, scaling, device)
    if rope_type == "dynamic":
        # NTK-aware: the base grows with the sequence length past the trained context
        factor = _need(scaling, "factor", rope_type)
        trained = _need(scaling, "max_position_embeddings", rope_type)
        length = max(seq_len if seq_len is not None else trained, trained)
        base = base * ((factor * length / trained) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = _base_inv_freq(dim, base, device)
    if rope_type == "linear":
        inv_freq = inv_freq / _need(scaling, "factor", rope_type)
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    return inv_freq, 1.0


def rotary_tables(
    dim: int,
    max_pos: int,
    base: float = 10000.0,
    rope_scaling: dict | None = None,
    *,
    seq_len: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, float]:
    """cos and sin tables (max_pos, dim / 2) for ``fastarch.ops.rotary``, and the attention factor.

    dim: the rotary dim (head_dim, or int(head_dim * partial_rotary_factor)), even. base: the
    config's rope_theta. rope_scaling: the config's rope_scaling / rope_parameters dict, keyed
    "rope_type" (or the older "type"): "default" (or None), "linear" (factor), "dynamic"
    (factor, max_position_embeddings: the config's), "llama3" (factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings), "yarn" (factor or
    max_position_embeddings, original_max_position_embeddings, optional attention_factor,
    beta_fast, beta_slow, mscale, mscale_all_dim, truncate).

    Dynamic NTK depends on the sequence length: pass ``seq_len`` = the longest position the
    tables must serve + 1 (what transformers computes as max(position_ids) + 1); lengths up to
    max_position_embeddings give the default tables. transformers recomputes them whenever the
    sequence grows past the longest seen and returns to the default ones for sequences back
    within max_position_embeddings: call this again at those points.

    cos and sin already include the attention factor (transformers multiplies both by it);
    it is returned for information. Tables are computed in fp32 and returned in ``dtype``
    (fp32 is what rotary takes; fp64 for fp64 inputs).
    """
    if isinstance(max_pos, bool) or not isinstance(max_pos, int) or max_pos < 1:
        raise ValueError(f"fastarch.rotary_tables: max_pos must be an int >= 1, got {max_pos!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"fastarch.rotary_tables: dtype must be a floating-point torch.dtype, got {dtype!r}")
    inv_freq, attention_factor = inverse_frequencies(dim, base, rope_scaling, seq_len, device)
    positions = torch.arange(max_pos, device=device, dtype=torch.int64).to(torch.float32)
    angles = positions[:, None] * inv_freq[None, :]
    cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
    return cos.to(dtype), sin.to(dtype), attention_factor
