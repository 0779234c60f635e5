"""bench/full_finetune_memory.py on the tiny model: a child run reports what the table needs, and the
optimizer-state bytes it reads from the live optimizer are those of the optimizer's tensors."""

from __future__ import annotations

import argparse

import pytest
from bench_scripts import load_bench_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("full_finetune_memory")


def args_for(tmp_path, **overrides):
    settings = dict(model="tiny", steps=2, batch_size=2, max_seq_len=96, lr=1e-3, device="cpu", precision="fp32", cpu_memory="default",
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


def test_rows_already_in_the_output_file_are_not_run_again(bench, tmp_path, monkeypatch, capsys):
    import json
    import sys

    output = tmp_path / "accuracy.json"
    kept = {"model": "tiny", "method": "adamw", "lr": 5e-5, "exact_match": 0.25, "peak_rss_mib": 1.0,
            "step_seconds": 1.0, "final_loss": 0.5, "first_loss": 2.0}
    output.write_text(json.dumps([kept]))
    ran = []
    monkeypatch.setattr(bench, "run_child", lambda method, model, args: ran.append(method) or {
        **kept, "method": method, "exact_match": 0.2})
    monkeypatch.setattr(sys, "argv", ["full_finetune_memory.py", "--accuracy", "--models", "tiny",
                                      "--methods", "adamw,lomo", "--output", str(output)])
    bench.main()
    assert ran == ["lomo"]  # adamw came from the file
    rows = json.loads(output.read_text())
    assert [(r["method"], r["exact_match"]) for r in rows] == [("adamw", 0.25), ("lomo", 0.2)]
    assert "0.80x" in capsys.readouterr().out  # lomo's 20% against the kept baseline's 25%
