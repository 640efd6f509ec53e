"""The MLLM around the tokenizer: Qwen2 + projector + LoRA/DoRA, and the data it reads."""

from viq.mllm.collate import (Batch, BatchPlan, ConversationDataset, Item, Skipped, collate,
                              placeholder_id)
from viq.mllm.model import MLLM, LMOutput, Projector, RegionalPool, apply_lora, build_llm

__all__ = ["Batch", "BatchPlan", "ConversationDataset", "Item", "Skipped", "collate", "placeholder_id",
           "MLLM", "LMOutput", "Projector", "RegionalPool", "apply_lora", "build_llm"]
