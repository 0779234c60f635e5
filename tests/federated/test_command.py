"""`tuneforge federated`: errors that stop a run before any process starts, and --write-app."""

from __future__ import annotations

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
