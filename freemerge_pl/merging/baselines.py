"""Cost-free baselines (filled in below)."""
