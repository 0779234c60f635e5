"""`tuneforge federated`: errors that stop a run before any process starts, and --write-app."""

from __future__ import annotations

import math

import yaml

from tuneforge.cli import main


def test_too_many_clients_stops_before_anything_starts(tmp_path, capsys):
    config = yaml.safe_load(open("examples/federated_lora.yaml"))
    config["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "federated.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["federated", str(path), "federated.clients=100000", "federated.partition=iid"]) == 2
    assert "federated.clients=100000 asks for more clients than there are examples" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no run directory, no SuperLink, no SuperNode


def test_write_app_names_the_tuneforge_apps(tmp_path):
    assert main(["federated", "unused.yaml", "--write-app", str(tmp_path / "app")]) == 0
    pyproject = (tmp_path / "app" / "pyproject.toml").read_text()
    assert 'serverapp = "tuneforge.federated.apps:server_app"' in pyproject
    assert 'clientapp = "tuneforge.federated.apps:client_app"' in pyproject


def test_a_busy_port_is_named_before_anything_starts(tmp_path):
    import socket

    from tuneforge.federated.launch import FederatedRunError, LocalFederation

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        federation = LocalFederation(tmp_path / "home", port - 1, 2, tmp_path, say=lambda _: None)
        try:
            federation.__enter__()
        except FederatedRunError as exc:
            assert f"port {port} on 127.0.0.1 is in use" in str(exc)
        else:
            federation.__exit__(None, None, None)
            raise AssertionError("a busy SuperNode port was not reported")
        assert federation.processes == []


def test_results_table_has_a_row_per_round_and_round_zero(capsys):
    from rich.console import Console

    from tuneforge.federated.command import results_table

    results = {"method": "fedavg", "clients": 2, "global_eval_loss": {"0": 3.0, "1": 2.5},
               "global_exact_match": {"1": 0.25},
               "rounds": {"1": {"up_bytes": {"a": 100, "b": 300}, "down_bytes": {"a": 50, "b": 50},
                                "clients": {"a": {}, "b": {}}, "failures": [{"node": "c", "reason": "x"}],
                                "rejected": [], "client_eval": {"a": {"eval-loss": 2.0}, "b": {"eval-loss": 3.0}}}}}
    Console(width=200).print(results_table(results))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert len(lines) == 2
    assert "3.0000" in lines[0] and "│ -" in lines[0]
    assert all(cell in lines[1] for cell in ("2.5000", "0.2500", "2.5000", "200", "50"))


def test_caption_totals_the_bytes_and_reports_privacy():
    from tuneforge.federated.accounting import privacy_report
    from tuneforge.federated.command import run_caption

    rounds = {"1": {"up_bytes": {"a": 100, "b": 300}, "down_bytes": {"a": 50, "b": 50}},
              "2": {"up_bytes": {"a": 7}, "down_bytes": {"a": 5, "b": 5}}}
    caption = run_caption({"rounds": rounds, "privacy": privacy_report(1.5, 1.0, 1e-5, 2)})
    assert "407 bytes up, 110 bytes down for training" in caption
    epsilon = 2 / 2 + (2 * 2 * math.log(1e5)) ** 0.5  # T/(2σ²) + √(2T·log(1/δ))/σ at σ = 1, T = 2
    assert "clipping norm 1.5" in caption and f"ε = {epsilon:.2f}" in caption
