"""The merge methods, one module per family; each registers its ``MergeMethod`` dataclasses on import.

The registry imports them by name on first use (``registry._BUILTIN_MODULES``); this package imports nothing.
"""
