"""The package version (a base-layer module: anything may import it)."""

__version__ = "0.1.0"
