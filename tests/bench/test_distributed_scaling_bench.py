"""bench/distributed_scaling.py on the tiny model: the 2-process setup reports both ranks, and rank 0's
final loss is the one-process run's (the runs are the same; only who computes which rows differs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench_scripts import load_bench_script

BENCH_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "distributed_scaling.py"


def test_two_ranks_report_their_memory_and_train_the_one_process_run(tmp_path, one_torch_thread):
    from tuneforge.config import parse_train_config
    from tuneforge.train import train

    bench = load_bench_script("distributed_scaling")
    output = tmp_path / "results.json"
    command = [sys.executable, str(BENCH_SCRIPT), "--model", "tiny", "--setups", "2x1", "--steps", "2",
               "--batch-size", "4", "--max-seq-len", "96", "--workdir", str(tmp_path), "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(bench.SRC)})
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = json.loads(output.read_text())
    assert row["processes"] == 2 and len(row["peak_memory_mib_per_rank"]) == 2
    assert all(peak > 0 for peak in row["peak_memory_mib_per_rank"]) and row["tokens_per_second"] > 0
    assert "| 2x1 | 2 x 1 |" in result.stdout

    args = type("Args", (), dict(steps=2, batch_size=4, max_seq_len=96, device="cpu"))
    one = train(parse_train_config(bench.train_settings(args, str(tmp_path / "tiny-model"), tmp_path / "one")))
    assert row["final_train_loss"] == pytest.approx(one.final_train_loss, rel=1e-5)


def test_the_fsdp_rows_train_the_same_run_and_report_the_memory_ratio(tmp_path):
    output = tmp_path / "results.json"
    command = [sys.executable, str(BENCH_SCRIPT), "--model", "tiny", "--setups", "full-1x1,fsdp-2x1", "--steps", "2",
               "--batch-size", "4", "--max-seq-len", "96", "--workdir", str(tmp_path), "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(load_bench_script("distributed_scaling").SRC)})
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = json.loads(output.read_text())
    assert (one["setup"], two["setup"]) == ("full-1x1", "fsdp-2x1") and len(two["peak_memory_mib_per_rank"]) == 2
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-5)  # the same run, sharded
    ratio = max(two["peak_memory_mib_per_rank"]) / one["peak_memory_mib_per_rank"][0]
    assert f"2 ranks / peak of 1 process: {ratio:.2f}x" in result.stdout
