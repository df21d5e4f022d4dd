"""Training: teacher targets (and, later, the hypernetwork training loop)."""
