"""Rank allocation and training variants of LoRA: AdaLoRA, DyLoRA, SoRA, LoRA-FA, ALLoRA, Hydra."""
