"""The offline zoos: ``vision`` (a procedural CLIP-style ViT, 8 image tasks) and ``text`` (all-MiniLM-L6-v2,
4 text tasks)."""
