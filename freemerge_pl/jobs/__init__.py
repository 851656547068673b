"""Jobs: the streaming merge job (mergekit-style YAML), tuning, interference analysis, LoRA merging."""
