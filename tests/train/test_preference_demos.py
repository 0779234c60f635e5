"""The bundled preference demos (examples/sft_arithmetic.yaml -> dpo_arithmetic.yaml / grpo_arithmetic.yaml)
run end to end on a tiny model, shrunk by dotted overrides: DPO starts from the SFT adapter and logs
rewards, margins, preference accuracy and exact match on held-out data; GRPO samples through the
serving engine and logs reward and KL; both plot them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tiny_models import build_tiny_tokenizer, tiny_llama, CHATML_TEMPLATE

from tuneforge.config import parse_train_config
from tuneforge.config.overrides import apply_overrides, load_config_file
from tuneforge.train import train
from tuneforge.train.metrics import OBJECTIVE_PLOT_FILE

EXAMPLES = Path(__file__).parents[2] / "examples"


def tiny_model_and_tokenizer():
    tokenizer = build_tiny_tokenizer(chat_template=CHATML_TEMPLATE)
    model = tiny_llama(0, vocab_size=len(tokenizer), hidden_size=48, num_attention_heads=4, max_position_embeddings=512)
    return model, tokenizer


def demo_config(name: str, tmp_path: Path, *overrides: str):
    data = apply_overrides(load_config_file(EXAMPLES / name), [
        f"output_dir={tmp_path / name.removesuffix('.yaml')}", "data.options.size=8", "data.eval_size=4",
        "data.max_seq_len=400", "training.max_steps=2", "training.eval_every=2", "training.log_every=1",
        "training.batch_size=2", *overrides])
    return parse_train_config(data, source=name)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_and_grpo_demos_run_on_top_of_the_sft_demo(tmp_path, one_torch_thread, caplog):
    sft = train(demo_config("sft_arithmetic.yaml", tmp_path, "training.eval_generate=2"),
                model_and_tokenizer=tiny_model_and_tokenizer())
    adapter = f"training.init_adapter={sft.adapter_dir}"

    dpo = train(demo_config("dpo_arithmetic.yaml", tmp_path, adapter, "training.eval_generate=2"),
                model_and_tokenizer=tiny_model_and_tokenizer())
    dpo_records = records(dpo.run_dir)
    evals = [r for r in dpo_records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    for key in ("eval_reward_chosen", "eval_reward_rejected", "eval_reward_margin", "eval_preference_accuracy",
                "eval_exact_match", "eval_kl"):
        assert key in evals[-1]
    assert evals[0]["eval_reward_margin"] == 0.0  # the policy starts as its reference, the SFT adapter
    assert any("reward_margin" in r and "train_loss" in r for r in dpo_records)
    assert (dpo.run_dir / OBJECTIVE_PLOT_FILE).stat().st_size > 0

    with caplog.at_level(logging.INFO, logger="tuneforge.train.objectives.grpo_sampling"):
        grpo = train(demo_config("grpo_arithmetic.yaml", tmp_path, adapter, "training.grpo_group_size=2",
                                 "training.grpo_max_new_tokens=3"),
                     model_and_tokenizer=tiny_model_and_tokenizer())
    assert "serving engine" in caplog.text and "generate, not" not in caplog.text
    grpo_records = records(grpo.run_dir)
    assert {"reward", "kl", "reward_failures"} <= set(next(r for r in grpo_records if "train_loss" in r))
    assert [r["step"] for r in grpo_records if "eval_reward" in r] == [0, 2]
    assert (grpo.run_dir / OBJECTIVE_PLOT_FILE).stat().st_size > 0
    assert not (sft.run_dir / OBJECTIVE_PLOT_FILE).exists()  # SFT has no preference metrics to plot


def test_eval_generate_is_accepted_for_pairs_and_refused_where_rewards_are_the_score():
    import pytest

    from tuneforge.errors import ConfigError

    assert parse_train_config({"training": {"objective": "dpo", "eval_generate": 4}}).training.eval_generate == 4
    for objective in ("kto", "grpo"):
        with pytest.raises(ConfigError, match="eval_generate"):
            parse_train_config({"training": {"objective": objective, "eval_generate": 4}})
