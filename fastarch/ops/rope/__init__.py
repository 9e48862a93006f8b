"""The rotary position embedding family: rotary (q and k rotated in one pass; GPT-NeoX/LLaMA
half-split and GPT-J interleaved layouts, partial rotary, GQA, offsets, packed sequences) and
rotary_tables (the cos/sin tables, with Hugging Face's rope_scaling variants).

api.py: the public function and its torch ops (fake implementations, autograd); tables.py: the
tables; reference.py: the definition of correct (and the last backend); backends.py: the one
table of backends; cpp.py, triton.py: the kernel ops they call.
"""

from fastarch.ops.rope.api import rotary
from fastarch.ops.rope.tables import rotary_tables

__all__ = ["rotary", "rotary_tables"]
