"""Quantized bases for QLoRA-style finetuning: blockwise NF4/FP4 (bitsandbytes' format), int8, and
``QuantLinear``, a frozen Linear that dequantizes chunk by chunk in forward and backward."""

from tuneforge.quant.blockwise import (
    BLOCKSIZES,
    QUANT_TYPES,
    DoubleQuant,
    QuantState,
    dequantize_4bit,
    dequantize_rows,
    quantize_4bit,
)
from tuneforge.quant.codebooks import codebook, dynamic_map
from tuneforge.quant.int8 import Int8State, dequantize_int8, quantize_int8
from tuneforge.quant.linear import QuantLinear, check_quant_settings
from tuneforge.quant.model import bits_per_parameter, quantize_model, quantized_layers
from tuneforge.quant.presets import QUANTIZE_CHOICES, quantization_settings

__all__ = [
    "BLOCKSIZES", "QUANTIZE_CHOICES", "QUANT_TYPES", "DoubleQuant", "Int8State", "QuantLinear", "QuantState",
    "bits_per_parameter", "check_quant_settings", "codebook", "dequantize_4bit", "dequantize_int8",
    "dequantize_rows", "dynamic_map", "quantization_settings", "quantize_4bit", "quantize_int8", "quantize_model",
    "quantized_layers",
]
