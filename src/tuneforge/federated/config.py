"""The ``federated:`` section of a config: everything else in the file is an ordinary train config.

    federated:
      clients: 4          # SuperNodes, one data partition each
      rounds: 5
      method: fedavg      # fedavg | ffa-lora | fedkseed
      partition: dirichlet
      alpha: 0.5          # Dirichlet concentration: small = each client sees few tasks/labels
      label_by: task      # what the Dirichlet split is over: task (the source dataset) or answer
      sources: [arithmetic, state_tracking]   # pooled tasks; default: data.train alone

Each round every client runs ``training`` (e.g. ``max_steps``) on its partition, starting from the
global adapter; the server averages what comes back.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tuneforge.config.schema import TrainConfig, parse_train_config
from tuneforge.errors import ConfigError


class PrivacySettings(BaseModel):
    """Central DP with fixed clipping (Geyer et al. 2017, arXiv:1710.06963): each client's update
    (its tensors minus the global ones) is clipped to L2 norm ``clipping_norm``, the clipped updates are
    averaged with equal weights, and Gaussian noise of std ``noise_multiplier · clipping_norm / m`` is
    added to the average of m updates."""

    model_config = ConfigDict(extra="forbid")

    clipping_norm: float = Field(..., gt=0, description="L2 bound of one client's update")
    noise_multiplier: float = Field(..., ge=0, description="noise std in units of clipping_norm / clients")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee the run reports (federated/accounting.py)")


class FederatedSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clients: int = Field(2, ge=1, description="number of clients (SuperNodes), one data partition each")
    rounds: int = Field(2, ge=1, description="federated rounds")
    method: Literal["fedavg", "ffa-lora", "fedkseed", "slora"] = Field(
        "fedavg", description="fedavg: average every adapter tensor; ffa-lora: A frozen and shared, only B sent; "
                              "fedkseed: zeroth-order full finetuning, clients send (seed, scalar) pairs; "
                              "slora: a sparse warm-up, then LoRA initialised by SVD of its update")
    slora_sparse_rounds: int = Field(1, ge=1, description="slora: rounds of the sparse stage (out of rounds)")
    slora_density: float = Field(0.01, gt=0, le=1, description="slora: fraction of each target weight trained in stage 1")
    seeds: int = Field(4096, ge=1, le=2**31 - 1, description="fedkseed: K, the candidate seeds shared by all parties")
    partition: Literal["iid", "dirichlet"] = Field("iid", description="how examples are split among clients")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (partition: dirichlet)")
    label_by: Literal["task", "answer"] = Field(
        "task", description="what a Dirichlet split is over: the source dataset or the gold answer")
    sources: list[str] = Field(default_factory=list, description="datasets pooled before splitting (default: data.train)")
    min_clients: int | None = Field(
        None, ge=1, description="replies a round needs to aggregate (default: all clients); fewer ends the run")
    round_timeout_s: float = Field(900.0, gt=0, description="seconds a round waits for client replies")
    accuracy_examples: int = Field(
        0, ge=0, description="union-eval examples the server scores by exact match each round (0: loss only)")
    compress_density: float | None = Field(
        None, gt=0, le=1, description="upload each change as ComPEFT sparse ternary keeping this fraction (null: dense)")
    privacy: PrivacySettings | None = Field(None, description="clip and noise client updates (central DP)")
    seed: int = Field(0, description="seed of the partition")
    port: int = Field(19091, ge=1024, le=65535, description="loopback port of the local SuperLink")

    @model_validator(mode="after")
    def _min_clients_fit(self) -> "FederatedSettings":
        if self.min_clients is not None and self.min_clients > self.clients:
            raise ValueError(f"min_clients={self.min_clients} is more than clients={self.clients}")
        return self

    def required_replies(self) -> int:
        return self.min_clients or self.clients


def parse_federated_config(data: dict[str, Any], source: str = "config") -> tuple[TrainConfig, FederatedSettings]:
    """Split a config dict into its train config and its ``federated`` section, both validated."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping of keys to values, found {type(data).__name__}")
    rest = dict(data)
    section = rest.pop("federated", None)
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: a federated config needs a `federated:` section (clients, rounds, method, ...); "
                          f"found {type(section).__name__}")
    try:
        settings = FederatedSettings(**section)
    except ValidationError as exc:
        problems = [f"  federated.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError(f"{source} has {len(problems)} problem(s) in `federated`:\n" + "\n".join(problems)) from None
    train_config = parse_train_config(rest, source)
    if settings.method == "ffa-lora" and train_config.adapter.method != "lora-fa":
        raise ConfigError(f"{source}: federated.method=ffa-lora trains B only with A frozen and shared; "
                          f"set adapter.method: lora-fa (found {train_config.adapter.method!r})")
    if settings.method == "fedkseed":
        _check_fedkseed(train_config, settings, source)
    if settings.method == "slora":
        if train_config.adapter.method != "lora":
            raise ConfigError(f"{source}: federated.method=slora initialises a LoRA by SVD in its second stage; set "
                              f"adapter.method: lora (found {train_config.adapter.method!r})")
        if settings.rounds <= settings.slora_sparse_rounds:
            raise ConfigError(f"{source}: federated.rounds={settings.rounds} leaves no LoRA round after "
                              f"federated.slora_sparse_rounds={settings.slora_sparse_rounds}: raise rounds above it")
    return train_config, settings


def _check_fedkseed(config: TrainConfig, settings: FederatedSettings, source: str) -> None:
    """FedKSeed's replay is exact only for plain MeZO steps on the full weights (federated/fedkseed.py)."""
    problems = []
    if config.adapter.method != "full":
        problems.append(f"adapter.method={config.adapter.method!r}: FedKSeed tunes the model's own weights, "
                        "which every party loads identically; set adapter.method: full")
    if config.update_rule.method != "mezo":
        problems.append(f"update_rule.method={config.update_rule.method!r}: FedKSeed's local steps are MeZO's; "
                        "set update_rule.method: mezo")
    if config.training.weight_decay:
        problems.append(f"training.weight_decay={config.training.weight_decay}: decay makes the steps non-linear "
                        "in the perturbations, so the seeds could not be replayed; set it to 0")
    if settings.compress_density is not None or settings.privacy is not None:
        problems.append("federated.compress_density and federated.privacy act on tensor updates; a FedKSeed "
                        "upload is (seed, scalar) pairs: leave both unset")
    if problems:
        raise ConfigError(f"{source}: federated.method=fedkseed needs:\n" + "\n".join(f"  {p}" for p in problems))
