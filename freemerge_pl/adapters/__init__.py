"""Model adapters: how checkpoints are read and turned into backbone/head modules."""

from freemerge_pl.adapters.base import ModelAdapter
from freemerge_pl.adapters.hf_clip import HFCLIPAdapter
from freemerge_pl.adapters.peft_lora import PeftLoRAAdapter
from freemerge_pl.adapters.timm_vit import TimmViTAdapter

__all__ = [
    "HFCLIPAdapter",
    "ModelAdapter",
    "PeftLoRAAdapter",
    "TimmViTAdapter",
]
