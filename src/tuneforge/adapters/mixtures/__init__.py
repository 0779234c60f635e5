"""Mixtures of LoRA experts: MixLoRA (trained experts, one router per FFN block) and MoLE-style routers over trained LoRAs."""
