"""Base models: embedded offline names, local directories, GGUF files and hub ids -> model + tokenizer."""

from tuneforge.models.embedded import EMBEDDED_MODELS, EmbeddedModel
from tuneforge.models.gguf_cache import tuneforge_home
from tuneforge.models.placement import DEVICE_CHOICES, DTYPE_CHOICES
from tuneforge.models.resolve import LoadedModel, load_model, load_tokenizer, resolve_model_dir

__all__ = [
    "DEVICE_CHOICES",
    "DTYPE_CHOICES",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "LoadedModel",
    "load_model",
    "load_tokenizer",
    "resolve_model_dir",
    "tuneforge_home",
]
