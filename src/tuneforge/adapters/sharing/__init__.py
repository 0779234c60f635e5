"""Parameter sharing: VeRA, VB-LoRA, MoS, LoRA-XS, LoRETTA, RoAd."""
