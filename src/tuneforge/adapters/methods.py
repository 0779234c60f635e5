"""Registry entries of the built-in methods: one ``register_method`` call per method family."""

from __future__ import annotations

from torch import nn

from tuneforge.adapters.config import LoraConfig
from tuneforge.adapters.lora.lora import build_lora
from tuneforge.adapters.registry import MethodSpec, register_method
from tuneforge.adapters.targeting import linear_layer_types


def lora_init_hooks(model, adapter_name, config):
    """Data-driven LoRA inits (corda, lora-ga, eva) calibrate in TrainingHooks.prepare (adapters/lora/inits/)."""
    from tuneforge.adapters.lora.inits import lora_init_hooks as hooks_for_init

    return hooks_for_init(model, adapter_name, config)


register_method(MethodSpec(
    name="lora",
    config_class=LoraConfig,
    supported_layers=lambda: linear_layer_types() + (nn.Embedding,),
    build=build_lora,
    hooks=lora_init_hooks,
    description="LoRA, rsLoRA (use_rslora) and DoRA (use_dora) on Linear, Conv1D and Embedding layers",
))

# Each section below is owned by one family; add registrations inside your own section only.
# --- section: LoRA initialisations (PiSSA, OLoRA, CorDA, LoRA-GA, EVA, LoftQ) ---
# The "lora" registration above passes hooks=lora_init_hooks: data-driven inits (corda, lora-ga,
# eva) see the first training batches through TrainingHooks.prepare.
# --- end section: LoRA initialisations ---

# --- section: rank allocation and training variants (AdaLoRA, DyLoRA, SoRA, LoRA-FA, ALLoRA, Hydra) ---
from tuneforge.adapters.rank.adalora import AdaLoraConfig, adalora_hooks, build_adalora  # noqa: E402

register_method(MethodSpec(
    name="adalora",
    config_class=AdaLoraConfig,
    supported_layers=linear_layer_types,
    build=build_adalora,
    hooks=adalora_hooks,
    description="AdaLoRA: SVD-form updates whose rank budget shrinks by importance during training",
))

from tuneforge.adapters.rank.allora import AlloraConfig, build_allora  # noqa: E402
from tuneforge.adapters.rank.dylora import DyLoraConfig, build_dylora, dylora_hooks  # noqa: E402
from tuneforge.adapters.rank.hydra import HydraConfig, build_hydra  # noqa: E402
from tuneforge.adapters.rank.lora_fa import LoraFaConfig, build_lora_fa  # noqa: E402
from tuneforge.adapters.rank.sora import SoraConfig, build_sora, sora_hooks  # noqa: E402

register_method(MethodSpec(
    name="dylora", config_class=DyLoraConfig, supported_layers=linear_layer_types, build=build_dylora,
    hooks=dylora_hooks, description="DyLoRA: every rank in [min_r, r] trained at once; pick the rank at deployment",
))
register_method(MethodSpec(
    name="sora", config_class=SoraConfig, supported_layers=linear_layer_types, build=build_sora,
    hooks=sora_hooks, description="SoRA: a per-rank gate sparsified by a proximal L1 step; zero gates prune ranks",
))
register_method(MethodSpec(
    name="lora-fa", config_class=LoraFaConfig, supported_layers=linear_layer_types, build=build_lora_fa,
    description="LoRA-FA: LoRA with A frozen at its random init, only B trains (a plain LORA file)",
))
register_method(MethodSpec(
    name="allora", config_class=AlloraConfig, supported_layers=linear_layer_types, build=build_allora,
    description="ALLoRA: LoRA without dropout or scaling, a per-row learning rate falling with the row's norm",
))
register_method(MethodSpec(
    name="hydra", config_class=HydraConfig, supported_layers=linear_layer_types, build=build_hydra,
    description="Hydra: a parallel LoRA branch plus a sequential low-rank map of the layer's output",
))
# --- end section: rank allocation ---

# --- section: parameter sharing (VeRA, VB-LoRA, MoS, LoRA-XS, LoRETTA, RoAd) ---
from tuneforge.adapters.sharing.vera import VeraConfig, build_vera  # noqa: E402

register_method(MethodSpec(
    name="vera",
    config_class=VeraConfig,
    supported_layers=linear_layer_types,
    build=build_vera,
    description="VeRA: one frozen random projection pair for the model, trainable scaling vectors per layer",
))
from tuneforge.adapters.sharing.lora_xs import LoraXsConfig, build_lora_xs  # noqa: E402

register_method(MethodSpec(
    name="lora-xs",
    config_class=LoraXsConfig,
    supported_layers=linear_layer_types,
    build=build_lora_xs,
    description="LoRA-XS: trainable r x r core between the frozen top-r singular vectors of W",
))
from tuneforge.adapters.sharing.vb_lora import VbLoraConfig, build_vb_lora  # noqa: E402

register_method(MethodSpec(
    name="vb-lora",
    config_class=VbLoraConfig,
    supported_layers=linear_layer_types,
    build=build_vb_lora,
    description="VB-LoRA: LoRA factors composed as top-k mixtures of one shared vector bank",
))
from tuneforge.adapters.sharing.road import RoadConfig, build_road  # noqa: E402

register_method(MethodSpec(
    name="road",
    config_class=RoadConfig,
    supported_layers=linear_layer_types,
    build=build_road,
    description="RoAd: learned 2D rotation and scaling of paired output elements (road_1/road_2/road_4)",
))
from tuneforge.adapters.sharing.mos import MosConfig, build_mos  # noqa: E402

register_method(MethodSpec(
    name="mos",
    config_class=MosConfig,
    supported_layers=linear_layer_types,
    build=build_mos,
    description="MoS: LoRA factors concatenated from shard pools shared across layers, plus private shards",
))
from tuneforge.adapters.sharing.loretta import LorettaConfig, build_loretta  # noqa: E402

register_method(MethodSpec(
    name="loretta",
    config_class=LorettaConfig,
    supported_layers=linear_layer_types,
    build=build_loretta,
    description="LoRETTA: the weight update as a tensor train of small cores (LoRETTA_rep)",
))
# --- end section: parameter sharing ---

# --- section: scaling, selective, bottleneck, sparse (IA3, BitFit, LN tuning, adapters, SHiRA, ...) ---
from tuneforge.adapters.selective.bitfit import BitFitConfig, build_bitfit  # noqa: E402
from tuneforge.adapters.selective.bottleneck import BottleneckConfig, build_bottleneck  # noqa: E402
from tuneforge.adapters.selective.ia3 import IA3Config, build_ia3  # noqa: E402
from tuneforge.adapters.selective.ln_tuning import LNTuningConfig, NormLayer, build_ln_tuning  # noqa: E402
from tuneforge.adapters.selective.layer_selective import LayerSelectConfig, build_layer_select, layer_select_hooks  # noqa: E402
from tuneforge.adapters.selective.shira import ShiraConfig, build_shira, shira_hooks  # noqa: E402
from tuneforge.adapters.selective.sparse_ft import SparseFTConfig, build_sparse_ft, sparse_ft_hooks  # noqa: E402
from tuneforge.adapters.selective.trainable_tokens import TrainableTokensConfig, build_trainable_tokens  # noqa: E402

register_method(MethodSpec(
    name="ia3", config_class=IA3Config, supported_layers=linear_layer_types, build=build_ia3,
    description="(IA)^3: learned scaling of keys/values (output side) and FFN inputs (feedforward_modules)",
))
register_method(MethodSpec(
    name="ln-tuning", config_class=LNTuningConfig, supported_layers=lambda: (NormLayer,), build=build_ln_tuning,
    description="LN tuning: trainable copies of the norm layers (LayerNorm, RMSNorm, ...)",
))
register_method(MethodSpec(
    name="bitfit", config_class=BitFitConfig, supported_layers=linear_layer_types, build=build_bitfit,
    description="BitFit: trains the target layers' existing biases; a bias-free target (e.g. any Llama linear) is "
                "an error unless add_missing_biases: true adds new biases",
))
register_method(MethodSpec(
    name="bottleneck", config_class=BottleneckConfig, supported_layers=lambda: (nn.Module,), build=build_bottleneck,
    description="bottleneck adapters: Houlsby, Pfeiffer or parallel placement (not mergeable)",
))
register_method(MethodSpec(
    name="shira", config_class=ShiraConfig, supported_layers=linear_layer_types, build=build_shira,
    hooks=shira_hooks, description="SHiRA: a fixed sparse mask of trainable base-weight entries",
))
register_method(MethodSpec(
    name="sparse-ft", config_class=SparseFTConfig, supported_layers=linear_layer_types, build=build_sparse_ft,
    hooks=sparse_ft_hooks,
    description="diff pruning: hard-concrete L0 gates on a weight delta (or magnitude-projection), projected to "
                "target_density, then the kept entries retrain on the fixed mask",
))
register_method(MethodSpec(
    name="layer-select", config_class=LayerSelectConfig, supported_layers=linear_layer_types,
    build=build_layer_select, hooks=layer_select_hooks,
    description="layer-selective finetuning: full-weight deltas for chosen decoder layers",
))
register_method(MethodSpec(
    name="trainable-tokens", config_class=TrainableTokensConfig,
    supported_layers=lambda: linear_layer_types() + (nn.Embedding,), build=build_trainable_tokens,
    description="trainable token embeddings: only rows token_indices of the embedding (and a tied head) train",
))
# --- end section: scaling, selective, bottleneck, sparse ---

# --- section: orthogonal and mixtures (OFT, BOFT, ETHER, HRA, MixLoRA, LoRA router) ---
from tuneforge.adapters.orthogonal.oft import OftConfig, build_oft  # noqa: E402

register_method(MethodSpec(
    name="oft",
    config_class=OftConfig,
    supported_layers=linear_layer_types,
    build=build_oft,
    description="OFT: block-diagonal orthogonal (Cayley) multiplier on the input side; COFT, block sharing",
))

from tuneforge.adapters.orthogonal.boft import BoftConfig, build_boft  # noqa: E402

register_method(MethodSpec(
    name="boft",
    config_class=BoftConfig,
    supported_layers=linear_layer_types,
    build=build_boft,
    description="BOFT: product of butterfly-permuted block-diagonal orthogonal factors, plus an output scale",
))

from tuneforge.adapters.orthogonal.hra import HraConfig, build_hra, hra_hooks  # noqa: E402

register_method(MethodSpec(
    name="hra",
    config_class=HraConfig,
    supported_layers=linear_layer_types,
    build=build_hra,
    hooks=hra_hooks,
    description="HRA: chain of r Householder reflections on the input side; Gram-Schmidt option, orthogonality loss",
))

from tuneforge.adapters.orthogonal.ether import EtherConfig, build_ether  # noqa: E402

register_method(MethodSpec(
    name="ether",
    config_class=EtherConfig,
    supported_layers=linear_layer_types,
    build=build_ether,
    description="ETHER (block Householder reflection of the output side) and ETHER+ (relaxed, both sides)",
))

from tuneforge.adapters.mixtures.mixlora import MixLoraConfig, build_mixlora, mixlora_hooks  # noqa: E402
from tuneforge.adapters.mixtures.mole import MoleConfig, build_mole, mole_hooks  # noqa: E402

register_method(MethodSpec(
    name="mixlora",
    config_class=MixLoraConfig,
    supported_layers=lambda: (nn.Module,),
    build=build_mixlora,
    hooks=mixlora_hooks,
    description="MixLoRA: one top-k router per FFN block over LoRA'd FFN experts, load-balancing loss (not mergeable)",
))
register_method(MethodSpec(
    name="mole",
    config_class=MoleConfig,
    supported_layers=linear_layer_types,
    build=build_mole,
    hooks=mole_hooks,
    description="MoLE-style routers over fixed, already-trained LoRAs (built by merge.lora_router.add_lora_router); "
                "trainable experts are refused: that method is now mixlora",
))
# --- end section: orthogonal and mixtures ---

# --- section: model-level (prompt, prefix, P-tuning, adaption prompt, LoReFT, DiReFT) ---
from tuneforge.adapters.model_level import training_form_hooks  # noqa: E402
from tuneforge.adapters.model_level.prompt_tuning import PromptTuningConfig, attach_prompt_tuning  # noqa: E402
from tuneforge.adapters.model_level.prefix_tuning import PrefixTuningConfig, attach_prefix_tuning  # noqa: E402
from tuneforge.adapters.model_level.p_tuning import PTuningConfig, attach_p_tuning  # noqa: E402
from tuneforge.adapters.model_level.adaption_prompt import AdaptionPromptConfig, attach_adaption_prompt  # noqa: E402
from tuneforge.adapters.model_level.reft import DiReftConfig, LoReftConfig, attach_reft  # noqa: E402

register_method(MethodSpec(
    name="prompt-tuning",
    config_class=PromptTuningConfig,
    attach=attach_prompt_tuning,
    description="prompt tuning: learned virtual token embeddings prepended to the input",
))

register_method(MethodSpec(
    name="prefix-tuning",
    config_class=PrefixTuningConfig,
    attach=attach_prefix_tuning,
    hooks=training_form_hooks,
    description="prefix tuning: learned key/value prefixes in every layer's attention cache",
))

register_method(MethodSpec(
    name="p-tuning",
    config_class=PTuningConfig,
    attach=attach_p_tuning,
    hooks=training_form_hooks,
    description="P-tuning: virtual tokens produced by an MLP or LSTM prompt encoder",
))

register_method(MethodSpec(
    name="adaption-prompt",
    config_class=AdaptionPromptConfig,
    attach=attach_adaption_prompt,
    description="LLaMA-Adapter: zero-gated prompts attended to in the top attention layers (Llama-style models)",
))

register_method(MethodSpec(
    name="loreft",
    config_class=LoReftConfig,
    attach=attach_reft,
    description="LoReFT: low-rank orthogonal edits of decoder-layer hidden states at chosen positions",
))

register_method(MethodSpec(
    name="direft",
    config_class=DiReftConfig,
    attach=attach_reft,
    description="DiReFT: low-rank (non-orthogonal) edits of decoder-layer hidden states at chosen positions",
))
# --- end section: model-level ---
