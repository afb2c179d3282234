"""The streaming rewrite engine: knows tensors and bytes, not architectures or strategies."""
