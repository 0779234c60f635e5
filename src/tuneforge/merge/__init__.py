"""Adapter arithmetic: combine LoRA adapters into a new one, and extract a LoRA from a finetuned model.

- ``combine_adapters``: linear / cat / svd / task_arithmetic / TIES / DARE / magnitude pruning (and
  their ``_svd`` forms) over LoRA adapters of one base, written as a new PEFT-format adapter;
- ``extract_lora``: truncated SVD of finetuned - base weights, per module, into a PEFT-format LoRA;
- ``methods``: the pure-torch merging functions (``ties``, ``dare``, ``magnitude_prune``, ...);
- ``full_model``: whole-model merging (those methods + slerp, model_stock), streamed from safetensors;
- ``export``: adapter merged into its base, written as a transformers dir or a GGUF file (``gguf_writer``);
- ``compress``: sparse ternary (ComPEFT) and SVD mixed-precision (Delta-CoMe) adapter compression;
- ``command``: the ``tuneforge merge`` / ``export`` / ``compress`` commands.
"""

from tuneforge.merge.combine import COMBINE_METHODS, combine_adapters, combine_loras
from tuneforge.merge.extract import ExtractionReport, ModuleExtraction, extract_lora
from tuneforge.merge.loras import LoraAdapter, LoraModule, lora_from_state, read_lora, write_lora
from tuneforge.merge.methods import dare, magnitude_prune, task_arithmetic, ties

__all__ = [
    "COMBINE_METHODS", "ExtractionReport", "LoraAdapter", "LoraModule", "ModuleExtraction", "combine_adapters",
    "combine_loras", "dare", "extract_lora", "lora_from_state", "magnitude_prune", "read_lora", "task_arithmetic",
    "ties", "write_lora",
]
