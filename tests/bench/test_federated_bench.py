"""bench/federated.py without running a federation (each is minutes): every row's config is a valid
federated config of the method it names, central rows fold the clients' steps into one, and the report
compares each method with its centralized reference and averages the bytes per client-round."""

from __future__ import annotations


import pytest
from bench_scripts import load_bench_script

from tuneforge.federated.config import parse_federated_config


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("federated")


def test_every_row_is_a_valid_config_of_its_method(bench, tmp_path):
    args = bench.parse_args(["--model", "smollm2-135m", "--output-dir", str(tmp_path), "--clients", "3",
                             "--steps", "5", "--rounds", "4"])
    methods = {}
    for index, row in enumerate(bench.ROWS):
        config, settings = parse_federated_config(bench.row_config(row, args, 19700 + 10 * index), row)
        methods[row] = (settings.method, config.adapter.method, settings.clients, config.training.max_steps)
        assert settings.rounds == 4 and config.output_dir == str(tmp_path / row)
    assert methods["fedavg"] == ("fedavg", "lora", 3, 5)
    assert methods["central"] == ("fedavg", "lora", 1, 15)  # same total steps as 3 clients × 5
    central = parse_federated_config(bench.row_config("central", args, 19700), "central")[0]
    assert central.data.eval_size == 3 * 64  # the union eval set the federated server scores
    assert methods["ffa-lora"][:2] == ("ffa-lora", "lora-fa")
    assert methods["slora"][:2] == ("slora", "lora")
    assert methods["fedkseed"] == ("fedkseed", "full", 3, 5) and methods["central-zo"] == ("fedkseed", "full", 1, 15)
    compeft = parse_federated_config(bench.row_config("compeft", args, 19700), "compeft")[1]
    assert compeft.compress_density == pytest.approx(0.1)


def test_report_compares_with_the_central_reference_and_averages_bytes(bench, tmp_path):
    def record(row, accuracy, up):
        rounds = {"1": {"up_bytes": {"a": up, "b": up * 3}, "down_bytes": {"a": 10, "b": 10}}}
        return {"row": row, "key": row, "seconds": 1.0,
                "results": {"global_exact_match": {"0": 0.0, "1": accuracy}, "global_eval_loss": {"0": 2.0, "1": 1.0},
                            "rounds": rounds}}

    text = bench.report([record("central", 0.5, 100), record("fedavg", 0.4, 100), record("fedkseed", 0.1, 50)], tmp_path)
    fedavg = next(line for line in text.splitlines() if line.startswith("| fedavg |"))
    assert "| 0.400 | 80% |" in fedavg and "| 200 | 10 |" in fedavg  # mean of 100 and 300 bytes up
    fedkseed = next(line for line in text.splitlines() if line.startswith("| fedkseed |"))
    assert "| 0.100 | - |" in fedkseed  # its reference (central-zo) was not run
    assert (tmp_path / "federated.md").read_text() == text
