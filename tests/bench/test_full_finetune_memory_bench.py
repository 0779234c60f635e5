"""bench/full_finetune_memory.py on the tiny model: a child run reports what the table needs, and the
optimizer-state bytes it reads from the checkpoint are those of the optimizer's tensors."""

from __future__ import annotations

import argparse

import pytest
from bench_scripts import load_bench_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("full_finetune_memory")


def args_for(tmp_path, **overrides):
    settings = dict(model="tiny", steps=2, batch_size=2, max_seq_len=96, lr=1e-3, device="cpu", precision="fp32",
                    workdir=str(tmp_path))
    return argparse.Namespace(**{**settings, **overrides})


def test_adamw_state_is_two_fp32_moments_per_weight_and_lomo_has_none(bench, tmp_path):
    from tiny_models import tiny_chat_model_and_tokenizer

    model, _ = tiny_chat_model_and_tokenizer()
    weights = sum(p.numel() for p in model.parameters())
    adamw = bench.run_tuneforge("adamw", args_for(tmp_path))
    # Two float32 moments per weight, plus one step counter per tensor.
    assert adamw["optimizer_state_bytes"] == 8 * weights + 4 * len(list(model.parameters()))
    lomo = bench.run_tuneforge("lomo", args_for(tmp_path))
    assert lomo["optimizer_state_bytes"] == 0
    for result in (adamw, lomo):
        assert result["peak_rss_mib"] > 0 and result["step_seconds"] > 0 and result["final_loss"] > 0
    bench.print_table([{"model": "tiny", "method": "adamw", **adamw}, {"model": "tiny", "method": "lomo", **lomo}])
