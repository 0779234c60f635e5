"""LoRA and its variants (rsLoRA, DoRA) and data-driven initialisations (inits/)."""
