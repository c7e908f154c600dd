"""Hot ops: a PyTorch reference, a fast path and one dispatcher per op."""
