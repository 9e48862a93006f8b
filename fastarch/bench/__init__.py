"""Benchmarks of fastarch's ops against PyTorch eager and torch.compile (``fastarch bench``).

- ``timing``: how contenders are warmed up and timed (interleaved rounds of batches; on CUDA
  back to back between events), and the machine's copy bandwidth;
- ``norms``: the norm cases (one module per op family: its ops, default shapes, and a ``Case``
  that builds the contenders and counts the bytes an iteration must move);
- ``report``: the table, the rows and the JSON;
- ``cli``: the ``fastarch bench`` command.
"""
