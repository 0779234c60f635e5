"""bench/method_comparison.py on the tiny model: its rows and files, checked against independent counts;
resuming from the results file; the report built from that file alone."""

from __future__ import annotations

import json
import math
import shutil
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from bench_scripts import load_bench_script
import torch

TINY_ARGS = ["--model", "tiny", "--methods", "lora,ia3", "--steps", "2", "--eval-examples", "4", "--device", "cpu",
             "--seeds", "1"]


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("method_comparison")


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("method_comparison")
    summaries = bench.main([*TINY_ARGS, "--jobs", "2", "--output-dir", str(root / "docs"),
                            "--work-dir", str(root / "work")])
    return {summary.name: summary.runs[0] for summary in summaries}, root


def results_lines(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "method_comparison.jsonl").read_text().splitlines()]


def crashing_child(name, options, seed):
    return [sys.executable, "-c", f"import sys; sys.exit('child ran: {name} seed {seed}')"]


def fake_child(accuracies: dict[str, float]):
    """A child that reports ``accuracies[name]`` (minus 1 point per seed) and fixed figures, in milliseconds."""
    def command(name, options, seed):
        result = {"exact_match": accuracies[name] - 0.01 * seed, "eval_loss": 1.0, "trainable_params": 100,
                  "adapter_bytes": 400, "peak_memory_mb": 10.0, "mean_step_seconds": 0.1}
        return [sys.executable, "-c", f"print('RESULT ' + {json.dumps(json.dumps(result))})"]
    return command


def adapted_linears(bench):
    """name -> (in_features, out_features) of the Linear layers in the upper half of the tiny model."""
    model, _ = bench.build_tiny_model_and_tokenizer()
    upper = range(model.config.num_hidden_layers // 2, model.config.num_hidden_layers)
    return {f"{index}.{name}": (module.in_features, module.out_features)
            for index in upper for name, module in model.model.layers[index].named_modules()
            if type(module).__name__ == "Linear"}


# --- the real tiny run -------------------------------------------------------------------------


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
        saved = root / "work" / f"{name}-seed0" / "adapter" / "adapter_model.safetensors"
        assert row.adapter_bytes == saved.stat().st_size
    # fp32 tensors plus a small header: at least 4 bytes per trainable parameter.
    assert rows["lora"].adapter_bytes >= 4 * rows["lora"].trainable_params


def test_diagnostics_cover_every_step(tiny_run):
    rows, _ = tiny_run
    for row in rows.values():
        assert len(row.train_losses) == len(row.grad_norms) == 2
        assert row.train_losses[-1] == pytest.approx(row.final_train_loss, abs=1e-4)
        assert all(math.isfinite(norm) and norm > 0 for norm in row.grad_norms)
        assert 0 < row.param_norm_start and 0 < row.param_norm_end
    # IA3's scales start at ones: the norm of all of them is sqrt(count).
    assert rows["ia3"].param_norm_start == pytest.approx(math.sqrt(rows["ia3"].trainable_params))
    # Every IA3 scale gets a gradient at step 1; LoRA's A only once B has left zero, at step 2.
    assert rows["ia3"].updated_fraction == 1.0 and rows["lora"].updated_fraction == 1.0


def test_report_and_plot_are_written(tiny_run):
    _, root = tiny_run
    markdown = (root / "docs" / "method_comparison.md").read_text()
    assert "--model tiny --methods lora,ia3 --steps 2" in markdown
    assert "| lora | ok | 1 |" in markdown and "| 17,408 | 1.00x |" in markdown
    assert "| ia3 | ok | 1 |" in markdown and f"| 256 | {256 / 17408:.2f}x |" in markdown
    assert "- machine: " in markdown and "finished " in markdown
    assert (root / "docs" / "method_comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [line["row"]["name"] for line in results_lines(root / "docs")] in (["lora", "ia3"], ["ia3", "lora"])


def test_a_rerun_skips_finished_rows_and_a_changed_setting_reruns(bench, tiny_run, tmp_path, monkeypatch):
    _, root = tiny_run
    docs = tmp_path / "docs"
    shutil.copytree(root / "docs", docs)
    monkeypatch.setattr(bench, "child_command", crashing_child)
    args = [*TINY_ARGS, "--output-dir", str(docs), "--work-dir", str(tmp_path / "work")]

    summaries = bench.main(args)  # same settings: nothing runs (a child would fail)
    assert [s.status for s in summaries] == ["ok", "ok"]
    assert len(results_lines(docs)) == 2

    monkeypatch.setitem(bench.METHOD_RUNS, "ia3", bench.MethodRun(bench.METHOD_RUNS["ia3"].adapter, lr=1e-2))
    summaries = {s.name: s for s in bench.main(args)}  # ia3's learning rate changed: ia3 alone reruns
    assert summaries["lora"].status == "ok" and summaries["ia3"].status == "failed"
    assert summaries["ia3"].failure.note == "child ran: ia3 seed 0"
    assert [line["row"]["name"] for line in results_lines(docs)][2:] == ["ia3"]

    summaries = {s.name: s for s in bench.main([*args, "--steps", "3"])}  # a new budget: every row reruns
    assert [s.status for s in summaries.values()] == ["failed", "failed"]


def test_a_changed_method_source_reruns_that_method(bench, tiny_run, tmp_path, monkeypatch):
    _, root = tiny_run
    docs = tmp_path / "docs"
    shutil.copytree(root / "docs", docs)
    monkeypatch.setattr(bench, "child_command", crashing_child)
    real_files = bench.method_source_files
    fixed_lora = tmp_path / "lora_fixed.py"
    fixed_lora.write_text("# a fixed LoRA\n")
    monkeypatch.setattr(bench, "method_source_files",
                        lambda run: [fixed_lora] if run.method == "lora" else real_files(run))
    summaries = {s.name: s for s in bench.main([*TINY_ARGS, "--output-dir", str(docs),
                                                "--work-dir", str(tmp_path / "work")])}
    assert summaries["lora"].status == "failed" and summaries["ia3"].status == "ok"


def test_the_source_digest_is_the_method_files(bench):
    lora, dora, pissa = (bench.MethodRun({"method": "lora", **extra}) for extra in
                         ({}, {"use_dora": True}, {"init": "pissa"}))
    names = {key: [path.name for path in bench.method_source_files(run)]
             for key, run in (("lora", lora), ("dora", dora), ("pissa", pissa))}
    assert names == {"lora": ["lora.py"], "dora": ["lora.py", "dora.py"], "pissa": ["lora.py", "pissa.py"]}
    assert len({bench.method_source_digest(run) for run in (lora, dora, pissa)}) == 3


# --- resuming, passes and budgets (fake children: milliseconds each) ----------------------------------


def fake_args(tmp_path, *extra):
    return ["--model", "tiny", "--methods", "base,lora,ia3,bitfit-added-biases,vera", "--steps", "2", "--device", "cpu",
            "--output-dir", str(tmp_path / "docs"), "--work-dir", str(tmp_path / "work"), *extra]


ACCURACIES = {"base": 0.0, "lora": 0.5, "ia3": 0.9, "bitfit-added-biases": 0.2, "vera": 0.7}


def test_the_second_seed_goes_to_the_top_rows_and_lora(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "child_command", fake_child(ACCURACIES))
    bench.main(fake_args(tmp_path, "--seeds", "2", "--top", "2"))
    measured = sorted((line["row"]["name"], line["row"]["seed"]) for line in results_lines(tmp_path / "docs"))
    # Top two by seed-0 accuracy are ia3 and vera; lora is the reference; base has no seed to vary.
    assert measured == sorted([(name, 0) for name in ACCURACIES] + [("ia3", 1), ("vera", 1), ("lora", 1)])
    markdown = (tmp_path / "docs" / "method_comparison.md").read_text()
    assert "| ia3 | ok | 2 | 89.5% (90.0%, 89.0%) | +40.0 |" in markdown  # lora's mean: (50 + 49) / 2


def test_limit_stops_the_run_and_the_next_run_continues(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "child_command", fake_child(ACCURACIES))
    summaries = bench.main(fake_args(tmp_path, "--limit", "2"))
    assert [s.status for s in summaries] == ["ok", "ok", "pending", "pending", "pending"]
    markdown = (tmp_path / "docs" / "method_comparison.md").read_text()
    assert "| bitfit-added-biases | pending |" in markdown
    bench.main(fake_args(tmp_path, "--limit", "2"))  # pass 2 must wait: vera has no seed-0 result yet
    assert sorted(line["row"]["seed"] for line in results_lines(tmp_path / "docs")) == [0, 0, 0, 0]
    summaries = bench.main(fake_args(tmp_path, "--top", "2"))
    assert all(s.status == "ok" for s in summaries)
    assert len(results_lines(tmp_path / "docs")) == 5 + 3  # each row once, then seed 1 for ia3, vera and lora


def test_max_minutes_stops_starting_rows(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "child_command", fake_child(ACCURACIES))
    monkeypatch.setattr(bench.time, "monotonic", iter([0.0] + [1e9] * 100).__next__)  # the deadline has passed
    summaries = bench.main(fake_args(tmp_path, "--max-minutes", "1"))
    assert all(s.status == "pending" for s in summaries)


def test_a_line_cut_off_mid_write_is_ignored_and_not_glued_to_the_next(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "child_command", fake_child(ACCURACIES))
    bench.main(fake_args(tmp_path, "--methods", "lora", "--seeds", "1"))
    results = tmp_path / "docs" / "method_comparison.jsonl"
    results.write_text(results.read_text() + '{"key": "cut off', encoding="utf-8")
    summaries = bench.main(fake_args(tmp_path, "--methods", "lora,ia3", "--seeds", "1"))
    assert "line 2 is not a result record" in capsys.readouterr().err
    assert [s.status for s in summaries] == ["ok", "ok"]
    lines = results.read_text().splitlines()
    assert lines[1] == '{"key": "cut off' and json.loads(lines[2])["row"]["name"] == "ia3"


# --- the report, from the results file alone --------------------------------------------------------


def synthetic_results(bench, tmp_path, rows: dict[str, dict]) -> Namespace:
    """Writes one result line per (row, seed) in ``rows`` with the keys a run would use; returns the options."""
    options = bench.parse_arguments(fake_args(tmp_path, "--methods", ",".join(rows)))
    plan, _ = bench.plan_rows(list(rows), bench.registered_methods())
    store = bench.ResultStore(tmp_path / "docs" / bench.RESULTS_FILE)
    for planned in plan:
        for seed, figures in enumerate(rows[planned.name]):
            settings = bench.row_settings(planned, options, seed)
            row = bench.Row(planned.name, planned.method, "ok", seed=seed, **figures)
            store.append(bench.settings_key(settings), settings, row, machine="test machine")
    return options


def test_the_table_and_plot_come_from_the_results_file(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "child_command", crashing_child)
    lora_losses = [2.0, 1.0, 0.5, 0.1]
    synthetic_results(bench, tmp_path, {
        "lora": [dict(exact_match=0.75, trainable_params=1000, adapter_bytes=4000, peak_memory_mb=200.0,
                      mean_step_seconds=2.0, eval_loss=0.2, train_losses=lora_losses, grad_norms=[4.0, 3, 2, 1],
                      updated_fraction=1.0),
                 dict(exact_match=0.25, trainable_params=1000, adapter_bytes=4000, peak_memory_mb=300.0,
                      mean_step_seconds=4.0, eval_loss=0.4)],
        "ia3": [dict(exact_match=0.375, trainable_params=250, adapter_bytes=1100, peak_memory_mb=125.0,
                     mean_step_seconds=1.5, eval_loss=0.9, train_losses=[2.0, 1.9, 1.8, 1.7],
                     grad_norms=[0.5, 0.25, 0.125, 0.0625], updated_fraction=0.25)],
    })
    summaries = bench.main(fake_args(tmp_path, "--methods", "lora,ia3", "--report-only"))
    assert [s.status for s in summaries] == ["ok", "ok"]
    markdown = (tmp_path / "docs" / "method_comparison.md").read_text()
    # lora: mean of 75% and 25% = 50%; memory (200 + 300) / 2 = 250; step (2 + 4) / 2 = 3.
    assert "| lora | ok | 2 | 50.0% (75.0%, 25.0%) | +0.0 | 1,000 | 1.00x | 4,000 | 1.00x | 250 | 1.00x |" in markdown
    assert "| ia3 | ok | 1 | 37.5% | -12.5 | 250 | 0.25x | 1,100 | 0.28x | 125 | 0.50x | 1.500 | 0.50x |" in markdown
    # Diagnostics of seed 0: loss at steps 1, 1 (25% of 4), 2 (50%), mean of the last 10% = the last step.
    assert "| lora | 2.000 | 2.000 | 1.000 | 0.100 | 4.000 | 1.000 | 100.0% |" in markdown
    trailing = markdown.split("points behind lora", 1)[1]
    assert "`ia3`: 37.5% vs 50.0% (-12.5 points)" in trailing and "1.700 (lora 0.100)" in trailing
    assert "updated 25.0% (100.0%)" in trailing
    assert (tmp_path / "docs" / "method_comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_runs_nothing_and_keeps_the_notes(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "child_command", crashing_child)
    report = tmp_path / "docs" / "method_comparison.md"
    report.parent.mkdir()
    report.write_text(f"old table\n{bench.NOTES_START}\nia3 trails because of X (measured: Y).\n{bench.NOTES_END}\n")
    summaries = bench.main(fake_args(tmp_path, "--methods", "lora,ia3", "--report-only"))
    assert [s.status for s in summaries] == ["pending", "pending"]
    text = report.read_text()
    assert "old table" not in text and "| lora | pending |" in text
    assert f"{bench.NOTES_START}\nia3 trails because of X (measured: Y).\n{bench.NOTES_END}" in text
    assert not (tmp_path / "docs" / bench.RESULTS_FILE).exists()


# --- planning ----------------------------------------------------------------------------------------


def test_methods_without_an_entry_and_entries_without_a_method(bench, monkeypatch):
    monkeypatch.delitem(bench.METHOD_RUNS, "ia3")
    plan, ignored = bench.plan_rows(None, {"lora": True, "ia3": True, "new-prompt-method": False})
    by_name = {row.name: row for row in plan}
    assert [row.name for row in plan][:2] == [bench.BASE_ROW, "lora"]
    # A layer method runs with its config's defaults; a model-level one is skipped.
    assert by_name["ia3"].run == bench.default_run("ia3") and not by_name["ia3"].skip_reason
    assert by_name["new-prompt-method"].skip_reason == "skipped: no benchmark config"
    # Entries for methods that are not registered (e.g. after a rename) are no rows, only notes.
    assert "dora" in by_name and "vera" not in by_name
    assert "METHOD_RUNS['vera'] ignored: method 'vera' is not registered" in ignored


def test_unknown_method_names_are_refused(bench):
    with pytest.raises(SystemExit, match="unknown no-such-method"):
        bench.plan_rows(["lora", "no-such-method"], {"lora": True})


def test_failing_children_are_recorded_and_the_run_goes_on(bench, monkeypatch, tmp_path):
    crashes = {
        "lora": "import sys; print('Traceback ...', file=sys.stderr); sys.exit('AdapterError: r=0 must be positive')",
        "ia3": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    }
    monkeypatch.setattr(bench, "child_command", lambda name, options, seed: [sys.executable, "-c", crashes[name]])
    summaries = bench.main(["--model", "tiny", "--methods", "lora,ia3", "--device", "cpu",
                            "--output-dir", str(tmp_path / "docs"), "--work-dir", str(tmp_path / "work")])
    assert [s.status for s in summaries] == ["failed", "failed"]
    assert summaries[0].failure.note == "AdapterError: r=0 must be positive"
    assert summaries[1].failure.note.startswith("child process killed by signal 9")
    markdown = (tmp_path / "docs" / "method_comparison.md").read_text()
    assert "| lora | failed |" in markdown and "AdapterError: r=0 must be positive" in markdown
    assert (tmp_path / "work" / "lora-seed0.failed.log").exists()


def test_every_config_in_the_table_is_valid_on_the_tiny_model(bench):
    registered = bench.registered_methods()
    model, tokenizer = bench.build_tiny_model_and_tokenizer()
    ctx = bench.RunContext(num_layers=model.config.num_hidden_layers, tokenizer=tokenizer, steps=2)
    options = Namespace(model="tiny", device="cpu", work_dir="/unused", steps=2, eval_examples=4, seed=0)
    plan, _ = bench.plan_rows(None, registered)
    for planned in plan:
        if planned.run is not None:
            config = bench.train_config(planned.name, bench.resolve_adapter(planned.run, ctx), planned.run.lr, options)
            assert config.adapter.method == planned.method


# --- the diagnostics, against values computed here ---------------------------------------------------


def test_training_diagnostics_measure_before_clipping(bench):
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3, bias=False)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.0)
    start_norm = float(layer.weight.detach().norm())
    expected_norms = []
    with bench.TrainingDiagnostics(steps=2).recording() as diagnostics:
        for _ in range(2):
            inputs = torch.randn(5, 4)
            inputs[:, 1] = 0.0  # column 1 of the weight never sees a gradient
            layer(inputs).pow(2).sum().backward()
            expected_norms.append(float(layer.weight.grad.norm()))
            torch.nn.utils.clip_grad_norm_(layer.parameters(), 1e-3)
            optimizer.step()
            optimizer.zero_grad()
    assert diagnostics.grad_norms == pytest.approx(expected_norms)
    assert min(expected_norms) > 1e-3  # so the recorded values are the ones before clipping
    assert diagnostics.updated_fraction == pytest.approx(3 / 4)
    assert diagnostics.param_norm_start == pytest.approx(start_norm)
    assert diagnostics.param_norm_end == pytest.approx(float(layer.weight.detach().norm()))
    assert torch.nn.utils.clip_grad_norm_.__name__ == "clip_grad_norm_"  # restored on exit


def test_training_diagnostics_ignore_an_optimizer_a_method_steps_itself(bench):
    """Diff pruning's hook clips and steps its gates' own Adam after the trainer's clip, before its step."""
    torch.manual_seed(0)
    layer, gate = torch.nn.Linear(4, 3, bias=False), torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.0)
    gate_optimizer = torch.optim.Adam([gate], lr=0.1)
    start_norm, expected_norms = float(layer.weight.detach().norm()), []
    with bench.TrainingDiagnostics(steps=2).recording() as diagnostics:
        for _ in range(2):
            (layer(torch.randn(5, 4)) * gate).pow(2).sum().backward()
            expected_norms.append(float(layer.weight.grad.norm()))
            torch.nn.utils.clip_grad_norm_(layer.parameters(), 1e-3)
            torch.nn.utils.clip_grad_norm_([gate], 1.0)  # the hook's own clip and step
            gate_optimizer.step()
            optimizer.step()
            optimizer.zero_grad()
            gate_optimizer.zero_grad()
    assert diagnostics.grad_norms == pytest.approx(expected_norms)
    assert diagnostics.steps_seen == 2
    assert diagnostics.param_norm_start == pytest.approx(start_norm)
    assert diagnostics.param_norm_end == pytest.approx(float(layer.weight.detach().norm()))
    assert diagnostics.updated_fraction == pytest.approx(1.0)


def test_the_reported_command_leaves_out_the_flags_that_only_steer_one_run(bench):
    assert bench.reproduce_command(["--report-only"]) == "python bench/method_comparison.py"
    assert (bench.reproduce_command(["--max-minutes", "125", "--steps", "100", "--jobs=2", "--rerun", "--limit", "3"])
            == "python bench/method_comparison.py --steps 100")
