"""Benchmarks of fastarch's ops against PyTorch eager and torch.compile (``fastarch bench``)."""
