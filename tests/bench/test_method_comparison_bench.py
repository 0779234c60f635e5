"""bench/method_comparison.py on the tiny model: its rows and files, checked against independent counts."""

from __future__ import annotations

import importlib.util
import math
import sys
from argparse import Namespace
from pathlib import Path

import pytest

BENCH_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "method_comparison.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("method_comparison_bench", BENCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("method_comparison")
    rows = bench.main(["--model", "tiny", "--methods", "lora,ia3", "--steps", "2", "--eval-examples", "4",
                       "--jobs", "2", "--device", "cpu", "--output-dir", str(root / "docs"),
                       "--work-dir", str(root / "work")])
    return {row.name: row for row in rows}, root


def adapted_linears(bench):
    """name -> (in_features, out_features) of the Linear layers in the upper half of the tiny model."""
    model, _ = bench.build_tiny_model_and_tokenizer()
    upper = range(model.config.num_hidden_layers // 2, model.config.num_hidden_layers)
    return {f"{index}.{name}": (module.in_features, module.out_features)
            for index in upper for name, module in model.model.layers[index].named_modules()
            if type(module).__name__ == "Linear"}


def test_each_row_trained_and_scored(tiny_run):
    rows, _ = tiny_run
    assert list(rows) == ["lora", "ia3"]
    for row in rows.values():
        assert row.status == "ok", row.note
        assert 0.0 <= row.exact_match <= 1.0
        assert math.isfinite(row.eval_loss) and 0 < row.eval_loss < 20  # ln(vocab of ~320) is ~5.8
        assert 0 < row.mean_step_seconds < 60
        assert 50 < row.peak_memory_mb < 16_000


def test_trainable_params_match_the_formulas(bench, tiny_run):
    rows, _ = tiny_run
    linears = adapted_linears(bench)
    rank = bench.METHOD_RUNS["lora"].adapter["r"]
    lora_params = sum(rank * (fan_in + fan_out) for fan_in, fan_out in linears.values())
    # IA3: one scale per output of k/v, one per input of the feed-forward down projection.
    ia3_params = sum(fan_out for name, (_, fan_out) in linears.items() if name.endswith(("k_proj", "v_proj")))
    ia3_params += sum(fan_in for name, (fan_in, _) in linears.items() if name.endswith("down_proj"))
    assert rows["lora"].trainable_params == lora_params == 16 * (4 * (64 + 64) + 3 * (64 + 128))
    assert rows["ia3"].trainable_params == ia3_params == 64 + 64 + 128


def test_adapter_bytes_are_the_saved_file_size(tiny_run):
    rows, root = tiny_run
    for name, row in rows.items():
        saved = root / "work" / name / "adapter" / "adapter_model.safetensors"
        assert row.adapter_bytes == saved.stat().st_size
    # fp32 tensors plus a small header: at least 4 bytes per trainable parameter.
    assert rows["lora"].adapter_bytes >= 4 * rows["lora"].trainable_params


def test_report_and_plot_are_written(tiny_run):
    _, root = tiny_run
    markdown = (root / "docs" / "method_comparison.md").read_text()
    assert "--model tiny --methods lora,ia3 --steps 2" in markdown
    assert "| lora | ok | 17,408 |" in markdown and "| ia3 | ok | 256 |" in markdown
    assert "- date: " in markdown and "- machine: " in markdown
    assert (root / "docs" / "method_comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_method_without_config_is_a_skipped_row(bench, monkeypatch):
    monkeypatch.delitem(bench.METHOD_RUNS, "ia3")
    plan = bench.plan_rows(None, ["lora", "ia3"])
    skipped = [row for row in plan if row.name == "ia3"]
    assert skipped and skipped[0].skip_reason == "skipped: no benchmark config"
    assert [row.name for row in plan][:2] == [bench.BASE_ROW, "lora"]


def test_unknown_method_names_are_refused(bench):
    with pytest.raises(SystemExit, match="unknown no-such-method"):
        bench.plan_rows(["lora", "no-such-method"], ["lora"])


def test_failing_children_are_recorded_and_the_run_goes_on(bench, monkeypatch, tmp_path):
    crashes = {
        "lora": "import sys; print('Traceback ...', file=sys.stderr); sys.exit('AdapterError: r=0 must be positive')",
        "ia3": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    }
    monkeypatch.setattr(bench, "child_command", lambda name, options: [sys.executable, "-c", crashes[name]])
    rows = bench.main(["--model", "tiny", "--methods", "lora,ia3", "--device", "cpu",
                       "--output-dir", str(tmp_path / "docs"), "--work-dir", str(tmp_path / "work")])
    assert [row.status for row in rows] == ["failed", "failed"]
    assert rows[0].note == "AdapterError: r=0 must be positive"
    assert rows[1].note.startswith("child process killed by signal 9")
    markdown = (tmp_path / "docs" / "method_comparison.md").read_text()
    assert "| lora | failed |" in markdown and "AdapterError: r=0 must be positive" in markdown
    assert (tmp_path / "work" / "lora.failed.log").exists()


def test_every_config_in_the_table_is_valid_on_the_tiny_model(bench):
    from tuneforge.adapters import list_methods

    registered = {spec.name for spec in list_methods()}
    model, tokenizer = bench.build_tiny_model_and_tokenizer()
    ctx = bench.RunContext(num_layers=model.config.num_hidden_layers, tokenizer=tokenizer, steps=2)
    options = Namespace(model="tiny", device="cpu", work_dir="/unused", steps=2, eval_examples=4)
    for name, run in bench.METHOD_RUNS.items():
        if run.method in registered:
            config = bench.train_config(name, bench.resolve_adapter(run, ctx), run.lr, options)
            assert config.adapter.method == run.method
