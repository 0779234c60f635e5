"""tuneforge: efficient finetuning of language models, from base model to served adapters."""

__version__ = "0.1.0"
