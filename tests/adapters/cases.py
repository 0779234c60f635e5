"""The table of adapter cases every shared check runs over (see test_shared_checks.py).

A new method adds rows here; a meta-test fails if a registered method has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tiny_models import tiny_gpt2, tiny_llama

from tuneforge.adapters import AdapterConfig, LoraConfig


@dataclass(frozen=True)
class AdapterCase:
    id: str
    make_config: Callable[[], AdapterConfig]
    make_model: Callable[[], object] = tiny_llama
    identity_at_init: bool = True
    mergeable: bool = True
    atol: float = 1e-5

    @property
    def method(self) -> str:
        return self.make_config().method


CASES = [
    AdapterCase("lora-llama-qv", lambda: LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    AdapterCase("lora-llama-all-linear", lambda: LoraConfig(r=2, target_modules="all-linear")),
    AdapterCase("lora-llama-regex", lambda: LoraConfig(r=2, target_modules=r".*\.mlp\.(up|down)_proj")),
    AdapterCase("lora-llama-gaussian-dropout",
                lambda: LoraConfig(r=4, init="gaussian", dropout=0.1, target_modules=["o_proj"])),
    AdapterCase("rslora-llama", lambda: LoraConfig(r=8, alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj"])),
    AdapterCase("lora-llama-rank-pattern",
                lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                                   alpha_pattern={"q_proj": 3.0})),
    AdapterCase("lora-llama-embedding", lambda: LoraConfig(r=4, target_modules=["embed_tokens", "gate_proj"])),
    AdapterCase("lora-llama-modules-to-save",
                lambda: LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    AdapterCase("lora-llama-layers", lambda: LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1])),
    AdapterCase("dora-llama", lambda: LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    AdapterCase("dora-llama-dropout", lambda: LoraConfig(r=4, use_dora=True, dropout=0.2, target_modules=["up_proj"])),
    AdapterCase("lora-gpt2-conv1d", lambda: LoraConfig(r=4, target_modules=["c_attn", "c_proj"]), make_model=tiny_gpt2),
    AdapterCase("dora-gpt2-conv1d", lambda: LoraConfig(r=4, use_dora=True, target_modules=["c_attn"]), make_model=tiny_gpt2),

    # Each section below is owned by one family; add rows inside your own section only.
    # --- section: LoRA initialisations ---
    # --- end section: LoRA initialisations ---
    # --- section: rank allocation ---
    # (config classes imported inline: the file's import block is outside this section)
    AdapterCase("adalora-llama", lambda: __import__("tuneforge.adapters.adalora", fromlist=["_"]).AdaLoraConfig(
        init_r=6, target_r=2, target_modules=["q_proj", "v_proj", "down_proj"])),
    AdapterCase("adalora-gpt2-conv1d", lambda: __import__("tuneforge.adapters.adalora", fromlist=["_"]).AdaLoraConfig(
        init_r=4, target_r=2, dropout=0.1, target_modules=["c_attn"]), make_model=tiny_gpt2),
    AdapterCase("dylora-llama", lambda: __import__("tuneforge.adapters.dylora", fromlist=["_"]).DyLoraConfig(
        r=4, min_r=2, target_modules=["q_proj", "v_proj", "up_proj"])),
    AdapterCase("dylora-gpt2-conv1d-eval-rank", lambda: __import__("tuneforge.adapters.dylora", fromlist=["_"])
                .DyLoraConfig(r=4, eval_rank=3, dropout=0.1, target_modules=["c_attn", "c_proj"]), make_model=tiny_gpt2),
    AdapterCase("sora-llama", lambda: __import__("tuneforge.adapters.sora", fromlist=["_"]).SoraConfig(
        r=4, target_modules=["q_proj", "o_proj", "down_proj"])),
    AdapterCase("sora-gpt2-conv1d", lambda: __import__("tuneforge.adapters.sora", fromlist=["_"]).SoraConfig(
        r=4, target_modules=["c_fc"]), make_model=tiny_gpt2),
    AdapterCase("lora-fa-llama", lambda: __import__("tuneforge.adapters.lora_fa", fromlist=["_"]).LoraFaConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"])),
    AdapterCase("lora-fa-gpt2-conv1d", lambda: __import__("tuneforge.adapters.lora_fa", fromlist=["_"]).LoraFaConfig(
        r=4, target_modules=["c_attn"]), make_model=tiny_gpt2),
    AdapterCase("allora-llama", lambda: __import__("tuneforge.adapters.allora", fromlist=["_"]).AlloraConfig(
        r=4, target_modules=["k_proj", "up_proj"])),
    AdapterCase("hydra-llama", lambda: __import__("tuneforge.adapters.hydra", fromlist=["_"]).HydraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    AdapterCase("hydra-gpt2-conv1d-bias", lambda: __import__("tuneforge.adapters.hydra", fromlist=["_"]).HydraConfig(
        r=4, dropout=0.1, target_modules=["c_attn", "c_proj"]), make_model=tiny_gpt2),
    # --- end section: rank allocation ---
    # --- section: parameter sharing ---
    # --- end section: parameter sharing ---
    # --- section: scaling, selective, bottleneck, sparse ---
    # --- end section: scaling, selective, bottleneck, sparse ---
    # --- section: orthogonal and mixtures ---
    # --- end section: orthogonal and mixtures ---
    # --- section: model-level ---
    # --- end section: model-level ---
]
