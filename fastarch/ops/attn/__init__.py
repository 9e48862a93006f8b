"""The attention family: fused attention (api.py), torch's scaled_dot_product_attention on it
(sdpa.py), decoding against a key/value cache (decode.py).

args.py: the options of a call as one object (AttentionArgs) and what supports checks see;
checks.py: the input checks; reference.py: the definition of correct (and the last backend);
backends.py: the one table of backends and what each supports; cpp.py, triton.py: the kernel
ops they call. (The package is "attn" so that ``fastarch.ops.attention`` stays the function.)
"""

from fastarch.ops.attn.api import attention
from fastarch.ops.attn.decode import append_kv, attention_decode
from fastarch.ops.attn.sdpa import scaled_dot_product_attention

__all__ = ["attention", "scaled_dot_product_attention", "attention_decode", "append_kv"]
