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
    # Data-driven inits (corda, lora-ga, eva) need batches: tests/adapters/test_lora_inits.py.
    AdapterCase("pissa-llama", lambda: LoraConfig(r=4, alpha=8, init="pissa", target_modules=["q_proj", "v_proj", "down_proj"])),
    AdapterCase("pissa-niter-llama-dropout",
                lambda: LoraConfig(r=4, init="pissa", pissa_niter=2, dropout=0.1, target_modules=["o_proj", "up_proj"])),
    AdapterCase("olora-llama-rslora", lambda: LoraConfig(r=4, init="olora", use_rslora=True, target_modules=["k_proj", "gate_proj"])),
    AdapterCase("pissa-gpt2-conv1d", lambda: LoraConfig(r=4, init="pissa", target_modules=["c_attn", "c_proj"]),
                make_model=tiny_gpt2),
    AdapterCase("olora-gpt2-conv1d", lambda: LoraConfig(r=4, init="olora", target_modules=["c_fc"]), make_model=tiny_gpt2),
    # --- end section: LoRA initialisations ---
    # --- section: rank allocation ---
    # (config classes imported inline: the file's import block is outside this section)
    AdapterCase("adalora-llama", lambda: __import__("tuneforge.adapters.rank.adalora", fromlist=["_"]).AdaLoraConfig(
        init_r=6, target_r=2, target_modules=["q_proj", "v_proj", "down_proj"])),
    AdapterCase("adalora-gpt2-conv1d", lambda: __import__("tuneforge.adapters.rank.adalora", fromlist=["_"]).AdaLoraConfig(
        init_r=4, target_r=2, dropout=0.1, target_modules=["c_attn"]), make_model=tiny_gpt2),
    AdapterCase("dylora-llama", lambda: __import__("tuneforge.adapters.rank.dylora", fromlist=["_"]).DyLoraConfig(
        r=4, min_r=2, target_modules=["q_proj", "v_proj", "up_proj"])),
    AdapterCase("dylora-gpt2-conv1d-eval-rank", lambda: __import__("tuneforge.adapters.rank.dylora", fromlist=["_"])
                .DyLoraConfig(r=4, eval_rank=3, dropout=0.1, target_modules=["c_attn", "c_proj"]), make_model=tiny_gpt2),
    AdapterCase("sora-llama", lambda: __import__("tuneforge.adapters.rank.sora", fromlist=["_"]).SoraConfig(
        r=4, target_modules=["q_proj", "o_proj", "down_proj"])),
    AdapterCase("sora-gpt2-conv1d", lambda: __import__("tuneforge.adapters.rank.sora", fromlist=["_"]).SoraConfig(
        r=4, target_modules=["c_fc"]), make_model=tiny_gpt2),
    AdapterCase("lora-fa-llama", lambda: __import__("tuneforge.adapters.rank.lora_fa", fromlist=["_"]).LoraFaConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"])),
    AdapterCase("lora-fa-gpt2-conv1d", lambda: __import__("tuneforge.adapters.rank.lora_fa", fromlist=["_"]).LoraFaConfig(
        r=4, target_modules=["c_attn"]), make_model=tiny_gpt2),
    AdapterCase("allora-llama", lambda: __import__("tuneforge.adapters.rank.allora", fromlist=["_"]).AlloraConfig(
        r=4, target_modules=["k_proj", "up_proj"])),
    AdapterCase("hydra-llama", lambda: __import__("tuneforge.adapters.rank.hydra", fromlist=["_"]).HydraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    AdapterCase("hydra-gpt2-conv1d-bias", lambda: __import__("tuneforge.adapters.rank.hydra", fromlist=["_"]).HydraConfig(
        r=4, dropout=0.1, target_modules=["c_attn", "c_proj"]), make_model=tiny_gpt2),
    # --- end section: rank allocation ---
    # --- section: parameter sharing ---
    AdapterCase("vera-llama", lambda: __import__("tuneforge.adapters.sharing.vera", fromlist=["_"]).VeraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    AdapterCase("vera-llama-no-projection-dropout", lambda: __import__("tuneforge.adapters.sharing.vera", fromlist=["_"]).VeraConfig(
        r=8, save_projection=False, dropout=0.1, target_modules=["o_proj", "up_proj"])),
    AdapterCase("vera-gpt2-conv1d", lambda: __import__("tuneforge.adapters.sharing.vera", fromlist=["_"]).VeraConfig(
        r=4, target_modules=["c_attn", "c_proj"]), make_model=tiny_gpt2),
    AdapterCase("lora-xs-llama", lambda: __import__("tuneforge.adapters.sharing.lora_xs", fromlist=["_"]).LoraXsConfig(
        r=4, alpha=8, target_modules=["q_proj", "k_proj", "down_proj"])),
    AdapterCase("lora-xs-gpt2-conv1d-dropout", lambda: __import__("tuneforge.adapters.sharing.lora_xs", fromlist=["_"]).LoraXsConfig(
        r=4, dropout=0.1, target_modules=["c_attn", "c_fc"]), make_model=tiny_gpt2),
    AdapterCase("vb-lora-llama", lambda: __import__("tuneforge.adapters.sharing.vb_lora", fromlist=["_"]).VbLoraConfig(
        r=4, num_vectors=16, vector_length=8, target_modules=["q_proj", "k_proj", "down_proj"]),
        identity_at_init=False),
    AdapterCase("vb-lora-gpt2-conv1d-topk-file", lambda: __import__("tuneforge.adapters.sharing.vb_lora", fromlist=["_"]).VbLoraConfig(
        r=2, num_vectors=8, vector_length=16, topk=3, save_only_topk_weights=True, target_modules=["c_attn"]),
        make_model=tiny_gpt2, identity_at_init=False),
    AdapterCase("road-1-llama", lambda: __import__("tuneforge.adapters.sharing.road", fromlist=["_"]).RoadConfig(
        group_size=8, target_modules=["q_proj", "k_proj", "down_proj"])),
    AdapterCase("road-4-llama", lambda: __import__("tuneforge.adapters.sharing.road", fromlist=["_"]).RoadConfig(
        variant="road_4", group_size=16, target_modules=["v_proj", "up_proj"])),
    AdapterCase("road-2-gpt2-conv1d-bias", lambda: __import__("tuneforge.adapters.sharing.road", fromlist=["_"]).RoadConfig(
        variant="road_2", group_size=4, target_modules=["c_attn", "c_proj"]), make_model=tiny_gpt2),
    AdapterCase("mos-llama", lambda: __import__("tuneforge.adapters.sharing.mos", fromlist=["_"]).MosConfig(
        r=4, shards_per_vector=4, pool_size=24, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])),
    AdapterCase("mos-gpt2-conv1d-private", lambda: __import__("tuneforge.adapters.sharing.mos", fromlist=["_"]).MosConfig(
        r=2, shards_per_vector=4, private_shards=1, pool_size=8, dropout=0.1, target_modules=["c_attn", "c_fc"]),
        make_model=tiny_gpt2),
    AdapterCase("loretta-llama", lambda: __import__("tuneforge.adapters.sharing.loretta", fromlist=["_"]).LorettaConfig(
        r=4, alpha=8.0, tt_rank=3, target_modules=["q_proj", "k_proj", "down_proj"])),
    AdapterCase("loretta-gpt2-conv1d-dropout", lambda: __import__("tuneforge.adapters.sharing.loretta", fromlist=["_"]).LorettaConfig(
        r=2, tt_rank=2, num_cores=2, dropout=0.1, target_modules=["c_attn", "c_proj"]), make_model=tiny_gpt2),
    # --- end section: parameter sharing ---
    # --- section: scaling, selective, bottleneck, sparse ---
    AdapterCase("ia3-llama-default", lambda: __import__("tuneforge.adapters.selective.ia3", fromlist=["_"]).IA3Config()),
    AdapterCase("ia3-gpt2-conv1d-bias", lambda: __import__("tuneforge.adapters.selective.ia3", fromlist=["_"]).IA3Config(
        target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]), make_model=tiny_gpt2),
    AdapterCase("ln-tuning-llama-all-norms",
                lambda: __import__("tuneforge.adapters.selective.ln_tuning", fromlist=["_"]).LNTuningConfig()),
    AdapterCase("ln-tuning-gpt2-layernorm", lambda: __import__("tuneforge.adapters.selective.ln_tuning", fromlist=["_"]).LNTuningConfig(
        target_modules=["ln_1", "ln_f"]), make_model=tiny_gpt2),
    AdapterCase("bitfit-gpt2-biases", lambda: __import__("tuneforge.adapters.selective.bitfit", fromlist=["_"]).BitFitConfig(),
                make_model=tiny_gpt2),
    # Llama's linear layers have no bias: only add_missing_biases adds some; merging then refuses (test_bitfit.py).
    AdapterCase("bitfit-llama-added-biases", lambda: __import__("tuneforge.adapters.selective.bitfit", fromlist=["_"]).BitFitConfig(
        target_modules=["q_proj", "down_proj"], add_missing_biases=True), mergeable=False),
    AdapterCase("bottleneck-llama-houlsby", lambda: __import__("tuneforge.adapters.selective.bottleneck", fromlist=["_"]).BottleneckConfig(
        reduction_factor=4), mergeable=False),
    AdapterCase("bottleneck-llama-parallel", lambda: __import__("tuneforge.adapters.selective.bottleneck", fromlist=["_"]).BottleneckConfig(
        placement="parallel", reduction_factor=8, non_linearity="silu", scaling=2.0), mergeable=False),
    AdapterCase("bottleneck-gpt2-pfeiffer", lambda: __import__("tuneforge.adapters.selective.bottleneck", fromlist=["_"]).BottleneckConfig(
        placement="pfeiffer", reduction_factor=4, non_linearity="gelu"), make_model=tiny_gpt2, mergeable=False),
    AdapterCase("shira-llama-density", lambda: __import__("tuneforge.adapters.selective.shira", fromlist=["_"]).ShiraConfig(
        density=0.05, target_modules=["q_proj", "v_proj", "down_proj"])),
    AdapterCase("shira-llama-magnitude", lambda: __import__("tuneforge.adapters.selective.shira", fromlist=["_"]).ShiraConfig(
        r=2, mask_type="magnitude", target_modules=["o_proj", "up_proj"])),
    AdapterCase("shira-gpt2-conv1d", lambda: __import__("tuneforge.adapters.selective.shira", fromlist=["_"]).ShiraConfig(
        r=2, target_modules=["c_attn", "c_fc"]), make_model=tiny_gpt2),
    AdapterCase("sparse-ft-llama", lambda: __import__("tuneforge.adapters.selective.sparse_ft", fromlist=["_"]).SparseFTConfig(
        target_density=0.05, target_modules=["q_proj", "up_proj"])),
    AdapterCase("sparse-ft-gpt2-conv1d", lambda: __import__("tuneforge.adapters.selective.sparse_ft", fromlist=["_"]).SparseFTConfig(
        target_density=0.1, target_modules=["c_attn"]), make_model=tiny_gpt2),
    AdapterCase("layer-select-llama", lambda: __import__("tuneforge.adapters.selective.layer_selective", fromlist=["_"]).LayerSelectConfig(
        layers=[1])),
    AdapterCase("layer-select-gpt2", lambda: __import__("tuneforge.adapters.selective.layer_selective", fromlist=["_"]).LayerSelectConfig(
        layers=[0]), make_model=tiny_gpt2),
    AdapterCase("trainable-tokens-llama", lambda: __import__("tuneforge.adapters.selective.trainable_tokens", fromlist=["_"])
                .TrainableTokensConfig(token_indices=[0, 5, 17, 101])),
    AdapterCase("trainable-tokens-gpt2-tied-head", lambda: __import__("tuneforge.adapters.selective.trainable_tokens", fromlist=["_"])
                .TrainableTokensConfig(token_indices=[3, 9, 64]), make_model=tiny_gpt2),
    # --- end section: scaling, selective, bottleneck, sparse ---
    # --- section: orthogonal and mixtures ---
    # (config classes imported inline: the file's import block is outside this section)
    AdapterCase("oft-llama", lambda: __import__("tuneforge.adapters.orthogonal.oft", fromlist=["_"]).OftConfig(
        oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    AdapterCase("oft-llama-r-coft-shared", lambda: __import__("tuneforge.adapters.orthogonal.oft", fromlist=["_"]).OftConfig(
        r=4, coft=True, eps=2.0, block_share=True, target_modules=["o_proj", "up_proj"])),
    AdapterCase("oft-llama-neumann-dropout", lambda: __import__("tuneforge.adapters.orthogonal.oft", fromlist=["_"]).OftConfig(
        oft_block_size=4, use_cayley_neumann=True, dropout=0.5, target_modules=["gate_proj", "k_proj"])),
    AdapterCase("oft-gpt2-conv1d", lambda: __import__("tuneforge.adapters.orthogonal.oft", fromlist=["_"]).OftConfig(
        oft_block_size=8, target_modules=["c_attn", "c_proj"]), make_model=tiny_gpt2),
    AdapterCase("boft-llama-butterfly", lambda: __import__("tuneforge.adapters.orthogonal.boft", fromlist=["_"]).BoftConfig(
        boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "up_proj"])),
    AdapterCase("boft-llama-block-num-dropout", lambda: __import__("tuneforge.adapters.orthogonal.boft", fromlist=["_"]).BoftConfig(
        boft_block_num=8, dropout=0.25, target_modules=["down_proj", "v_proj"])),
    AdapterCase("boft-gpt2-conv1d-bias", lambda: __import__("tuneforge.adapters.orthogonal.boft", fromlist=["_"]).BoftConfig(
        boft_block_size=8, boft_n_butterfly_factor=3, target_modules=["c_fc", "c_attn"]), make_model=tiny_gpt2),
    AdapterCase("hra-llama", lambda: __import__("tuneforge.adapters.orthogonal.hra", fromlist=["_"]).HraConfig(
        r=4, target_modules=["q_proj", "v_proj"])),
    # Gram-Schmidt turns the chain into one reflection of the span: never the identity.
    AdapterCase("hra-llama-gram-schmidt", lambda: __import__("tuneforge.adapters.orthogonal.hra", fromlist=["_"]).HraConfig(
        r=3, apply_GS=True, orthogonality_weight=1e-3, target_modules=["down_proj"]), identity_at_init=False),
    AdapterCase("hra-gpt2-conv1d", lambda: __import__("tuneforge.adapters.orthogonal.hra", fromlist=["_"]).HraConfig(
        r=2, target_modules=["c_attn", "c_fc"]), make_model=tiny_gpt2),
    # ETHER starts from a random reflection (the paper's choice); ETHER+ starts at u = v, the identity.
    AdapterCase("ether-llama", lambda: __import__("tuneforge.adapters.orthogonal.ether", fromlist=["_"]).EtherConfig(
        nb=4, target_modules=["q_proj", "up_proj"]), identity_at_init=False),
    AdapterCase("ether-plus-llama", lambda: __import__("tuneforge.adapters.orthogonal.ether", fromlist=["_"]).EtherConfig(
        nb=2, plus=True, target_modules=["v_proj", "down_proj"])),
    AdapterCase("ether-plus-gpt2-conv1d-bias", lambda: __import__("tuneforge.adapters.orthogonal.ether", fromlist=["_"]).EtherConfig(
        nb=2, plus=True, target_modules=["c_attn", "c_proj"]), make_model=tiny_gpt2),
    # Routing depends on the input: a mixture of experts cannot be merged (test_mixlora.py checks the refusal).
    AdapterCase("mixlora-llama-ffn", lambda: __import__("tuneforge.adapters.mixtures.mixlora", fromlist=["_"]).MixLoraConfig(
        num_experts=3, top_k=2, r=4), mergeable=False),
    AdapterCase("mixlora-gpt2-conv1d-top1-dropout", lambda: __import__("tuneforge.adapters.mixtures.mixlora", fromlist=["_"])
                .MixLoraConfig(num_experts=4, top_k=1, r=2, dropout=0.1), make_model=tiny_gpt2, mergeable=False),
    # Routers over fixed LoRAs (merge.lora_router fills the experts; here they are random placeholders).
    AdapterCase("mole-router-llama-fixed-experts", lambda: __import__("tuneforge.adapters.mixtures.mole", fromlist=["_"]).MoleConfig(
        num_experts=3, top_k=2, r=4, train_experts=False, target_modules=["q_proj", "down_proj"]),
        identity_at_init=False, mergeable=False),
    # --- end section: orthogonal and mixtures ---
    # --- section: model-level ---
    AdapterCase("prompt-tuning-llama", lambda: __import__("tuneforge.adapters.model_level.prompt_tuning", fromlist=["_"])
                .PromptTuningConfig(num_virtual_tokens=4), identity_at_init=False, mergeable=False),
    AdapterCase("prompt-tuning-llama-sample-vocab", lambda: __import__("tuneforge.adapters.model_level.prompt_tuning", fromlist=["_"])
                .PromptTuningConfig(num_virtual_tokens=3, init="sample-vocab"), identity_at_init=False, mergeable=False),
    AdapterCase("prompt-tuning-gpt2", lambda: __import__("tuneforge.adapters.model_level.prompt_tuning", fromlist=["_"])
                .PromptTuningConfig(num_virtual_tokens=4), make_model=tiny_gpt2, identity_at_init=False, mergeable=False),
    AdapterCase("prefix-tuning-llama", lambda: __import__("tuneforge.adapters.model_level.prefix_tuning", fromlist=["_"])
                .PrefixTuningConfig(num_virtual_tokens=3), identity_at_init=False, mergeable=False),
    AdapterCase("prefix-tuning-llama-projection", lambda: __import__("tuneforge.adapters.model_level.prefix_tuning", fromlist=["_"])
                .PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8),
                identity_at_init=False, mergeable=False),
    AdapterCase("prefix-tuning-gpt2", lambda: __import__("tuneforge.adapters.model_level.prefix_tuning", fromlist=["_"])
                .PrefixTuningConfig(num_virtual_tokens=3), make_model=tiny_gpt2, identity_at_init=False, mergeable=False),
    AdapterCase("p-tuning-llama-mlp", lambda: __import__("tuneforge.adapters.model_level.p_tuning", fromlist=["_"])
                .PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8), identity_at_init=False, mergeable=False),
    AdapterCase("p-tuning-llama-lstm", lambda: __import__("tuneforge.adapters.model_level.p_tuning", fromlist=["_"])
                .PTuningConfig(num_virtual_tokens=3, encoder_reparameterization_type="LSTM", encoder_hidden_size=8),
                identity_at_init=False, mergeable=False),
    AdapterCase("adaption-prompt-llama", lambda: __import__("tuneforge.adapters.model_level.adaption_prompt", fromlist=["_"])
                .AdaptionPromptConfig(adapter_len=4, adapter_layers=2), mergeable=False),  # zero gate: identity
    AdapterCase("loreft-llama", lambda: __import__("tuneforge.adapters.model_level.reft", fromlist=["_"])
                .LoReftConfig(layers=[0, 1], positions="f2+l2", r=2), identity_at_init=False, mergeable=False),
    AdapterCase("loreft-llama-all-positions", lambda: __import__("tuneforge.adapters.model_level.reft", fromlist=["_"])
                .LoReftConfig(layers=[1], positions="all", r=3), identity_at_init=False, mergeable=False),
    AdapterCase("direft-llama", lambda: __import__("tuneforge.adapters.model_level.reft", fromlist=["_"])
                .DiReftConfig(layers="all", positions="l3", r=2), identity_at_init=False, mergeable=False),
    AdapterCase("loreft-gpt2", lambda: __import__("tuneforge.adapters.model_level.reft", fromlist=["_"])
                .LoReftConfig(layers=[0], positions="f1+l1", r=2), make_model=tiny_gpt2,
                identity_at_init=False, mergeable=False),
    # --- end section: model-level ---
]
