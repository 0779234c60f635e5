"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens produced by a prompt encoder.

Paper: Liu et al., "GPT Understands, Too", 2021, arXiv:2103.10385; implements the prompt encoder of its
method section: the virtual tokens h_i are produced by an LSTM-plus-MLP (or MLP) encoder over trainable
embeddings.

Trainable embeddings (num_virtual_tokens × hidden) go through an MLP (Linear-ReLU-Linear-ReLU-Linear)
or a bidirectional LSTM followed by Linear-ReLU-Linear (``encoder_reparameterization_type``); the
encoder's output is prepended to the input exactly like a prompt-tuning prompt (see prompt_tuning.py).
Files hold the encoder's output (PEFT's ``prompt_embeddings``), so a loaded adapter uses that tensor
directly and has no encoder; training checkpoints keep the encoder too (``TrainingFormHooks``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from tuneforge.adapters.model_level import ModelLevelConfig, check_position_budget, text_config
from tuneforge.adapters.model_level.prompt_tuning import VirtualPromptAdapter


class PTuningConfig(ModelLevelConfig):
    method: Literal["p-tuning"] = "p-tuning"
    num_virtual_tokens: int = Field(20, gt=0)
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = Field(None, gt=0, description="encoder width; default: the model's hidden size")
    encoder_num_layers: int = Field(2, gt=0, description="LSTM layers (the MLP always has three Linear layers)")
    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout between LSTM layers")

    peft_type: ClassVar[str] = "P_TUNING"


class LstmHead(nn.Module):
    def __init__(self, width: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(width, hidden, num_layers=layers, dropout=dropout, bidirectional=True, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.lstm(tokens.unsqueeze(0))[0]).squeeze(0)


class PromptEncoder(nn.Module):
    """The training-time form: trainable embeddings through an MLP or LSTM head."""

    def __init__(self, config: PTuningConfig, width: int):
        super().__init__()
        hidden = config.encoder_hidden_size or width
        self.embedding = nn.Parameter(torch.randn(config.num_virtual_tokens, width))
        if config.encoder_reparameterization_type == "LSTM":
            self.head = LstmHead(width, hidden, config.encoder_num_layers, config.encoder_dropout)
        else:
            self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                      nn.Linear(hidden, width))

    def forward(self) -> torch.Tensor:
        return self.head(self.embedding)


class PTuningAdapter(VirtualPromptAdapter):
    def __init__(self, config: PTuningConfig, model_config: Any):
        super().__init__(config.num_virtual_tokens, model_config)
        self.encoder = PromptEncoder(config, model_config.hidden_size)
        self.prompt_embeddings = None  # the encoder's output, once loaded from a file

    def prompt(self) -> torch.Tensor:
        return self.encoder() if self.encoder is not None else self.prompt_embeddings

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompt()}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        loaded = tensors["prompt_embeddings"].to(self.prompt().device, torch.float32)
        self.encoder = None  # files hold the encoder's output; the encoder itself is not recoverable
        self.prompt_embeddings = nn.Parameter(loaded.clone())

    def training_form(self) -> nn.Module | None:
        return self.encoder

    def restore_training_form(self, form: nn.Module) -> None:
        self.encoder, self.prompt_embeddings = form, None


def attach_p_tuning(model: nn.Module, config: PTuningConfig, adapter_name: str) -> PTuningAdapter:
    model_config = text_config(model)
    check_position_budget(model_config, config.num_virtual_tokens, 1)
    return PTuningAdapter(config, model_config)
