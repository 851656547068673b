"""The offline zoos: ``vision`` (a procedural CLIP-style ViT, 8 image tasks) and ``text`` (all-MiniLM-L6-v2,
4 text tasks).

Each is a ``ZooSpec`` (``freemerge_pl.zoo.spec``: names, manifest format, sizes, recipe, build plan, writer)
over one cache (``freemerge_pl.zoo.cache``: find, stale reason, resumable build, atomic publish, verify) and one
command line (``freemerge_pl.zoo.cli``: ``python -m freemerge_pl.zoo.vision``, ``python -m freemerge_pl.zoo.text``
or ``python -m freemerge_pl.zoo --zoo vision|text``)."""
