"""The Lightning layer: ``MergedModule`` (hooks), the routed model, the data module, metrics and the CLI."""
