"""``tuneforge federated cfg.yaml``: a Flower federation on this machine, with Flower's own runtime.

A SuperLink and one SuperNode per client start as processes on 127.0.0.1 (no Ray: Flower's
simulation engine needs it, its deployment runtime does not), ``flwr run`` submits the apps of
``apps.py``, and every process is stopped when the run ends, fails or times out. The same app
directory runs on real machines: docs/federated.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tuneforge.config.overrides import apply_overrides, load_config_file
from tuneforge.config.schema import resolved_output_dir
from tuneforge.errors import TuneforgeError
from tuneforge.federated.config import parse_federated_config
from tuneforge.federated.data import client_parts, pooled_examples
from tuneforge.fileio import atomic_write_json, atomic_write_text

APP_PYPROJECT = """\
# A Flower app: the apps live in the installed tuneforge package; this file only names them.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tuneforge-federated"
version = "1.0.0"
description = "tuneforge adapters trained with Flower"
license = "Apache-2.0"
dependencies = []  # tuneforge and flwr are installed on every machine; Flower installs nothing

[tool.flwr.app]
publisher = "tuneforge"

[tool.flwr.app.components]
serverapp = "tuneforge.federated.apps:server_app"
clientapp = "tuneforge.federated.apps:client_app"

[tool.flwr.app.config]
config = ""
results = ""
"""


class FederatedRunError(TuneforgeError):
    """The Flower federation did not finish; the message names the log to read."""


def run_federated(config_path: str | Path, overrides: list[str] | None = None, *,
                  say: Callable[[str], None] = print) -> dict:
    """Run the federation ``config_path`` describes; returns (and writes) its results."""
    raw = apply_overrides(load_config_file(config_path), overrides or [])
    config, settings = parse_federated_config(raw, str(config_path))
    _check_partitions(config, settings)  # a data split that cannot work stops us before any process starts
    run_dir = resolved_output_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "federated_config.json"
    atomic_write_json(resolved, raw)
    app_dir = write_flower_app(run_dir / "flower_app")
    home = run_dir / "flwr_home"
    results = run_dir / "federated_results.json"
    results.unlink(missing_ok=True)
    deadline = settings.rounds * 2 * settings.round_timeout_s + 300
    with LocalFederation(home, settings.port, settings.clients, run_dir, say) as federation:
        federation.run_app(app_dir, {"config": str(resolved), "results": str(results)}, deadline)
    if not results.exists():
        raise FederatedRunError(f"the federation ended without results; read {run_dir / 'logs'}")
    return json.loads(results.read_text(encoding="utf-8"))


def _check_partitions(config, settings) -> None:
    _, labels = pooled_examples(config, settings, "train")
    client_parts(labels, settings)


def write_flower_app(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "pyproject.toml", APP_PYPROJECT)
    return directory


def flower_executable(name: str) -> str:
    """A Flower command beside this interpreter (its virtual environment), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise FederatedRunError(f"`{name}` was not found: install Flower with `pip install tuneforge[federated]`")
    return found


class LocalFederation:
    """A SuperLink and ``clients`` SuperNodes on 127.0.0.1, each in its own process group."""

    def __init__(self, home: Path, port: int, clients: int, run_dir: Path, say: Callable[[str], None]):
        self.home, self.port, self.clients, self.say = home, port, clients, say
        self.logs = run_dir / "logs"
        self.workdir = run_dir / "clients"
        self.processes: list[subprocess.Popen] = []
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "FLWR_HOME": str(home), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}

    def __enter__(self) -> "LocalFederation":
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.home / "config.toml",
                          f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                          f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        _check_ports_free(self.port, self.clients + 1)
        try:
            self._start("superlink", [flower_executable("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--database", ":flwr-in-memory:",
                                      "--disable-runtime-dependency-installation"])
            _wait_for_port(self.port, 60, self.logs / "superlink.log")
            for client in range(self.clients):
                self.add_supernode(client, client, self.clients)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.say(f"Flower SuperLink on 127.0.0.1:{self.port}, {self.clients} SuperNode(s); logs in {self.logs}")
        return self

    def add_supernode(self, index: int, partition_id: int, partitions: int) -> None:
        """SuperNode ``index`` holding data partition ``partition_id`` of ``partitions``."""
        node_config = f'partition-id={partition_id} num-partitions={partitions} workdir="{self.workdir}"'
        self._start(f"supernode-{index}", [
            flower_executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--host", "127.0.0.1", "--port", str(self.port + 1 + index), "--node-config", node_config])

    def _start(self, name: str, command: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "wb")
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                               start_new_session=True))
        log.close()

    def run_app(self, app_dir: Path, run_config: dict[str, str], timeout_s: float) -> None:
        settings = " ".join(f'{key}="{value}"' for key, value in run_config.items())
        command = [flower_executable("flwr"), "run", str(app_dir), "local", "--stream", "--run-config", settings]
        with open(self.logs / "flwr_run.log", "wb") as log:
            try:
                finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                          timeout=timeout_s, check=False)
            except subprocess.TimeoutExpired:
                raise FederatedRunError(f"the federation ran past {timeout_s:.0f} s and was stopped; "
                                        f"read {self.logs}") from None
        if finished.returncode != 0:
            raise FederatedRunError(f"`flwr run` exited with {finished.returncode}; read {self.logs / 'flwr_run.log'}")

    def __exit__(self, *exc) -> None:
        for process in reversed(self.processes):  # each process group is one we started
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _check_ports_free(first: int, count: int) -> None:
    """The SuperLink takes ``first``, the SuperNodes the next ports: fail now, not as a confusing hang."""
    for port in range(first, first + count):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise FederatedRunError(f"port {port} on 127.0.0.1 is in use (federated.port={first} takes ports "
                                        f"{first}..{first + count - 1}); set another federated.port")


def _wait_for_port(port: int, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise FederatedRunError(f"the SuperLink did not open 127.0.0.1:{port} within {timeout_s:.0f} s; read {log}")
