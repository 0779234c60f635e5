"""The Flower apps: a ClientApp that trains the adapter on its own partition with ``tuneforge.train``,
and a ServerApp whose strategy screens and averages what comes back.

Both run under Flower's own runtime (SuperLink + SuperNodes; ``launch.py`` starts them on loopback).
The server reads the tuneforge config (run config key ``config``) and sends it with every round, so a
client machine needs only tuneforge, its data and its ``partition-id`` / ``num-partitions`` node config.
"""

from __future__ import annotations

import json
import tempfile
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_clip_model_update, compute_stdv
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from tuneforge.adapters import add_adapter
from tuneforge.adapters.peft_format import fill_adapter_weights
from tuneforge.config.overrides import load_config_file
from tuneforge.config.schema import TrainConfig
from tuneforge.errors import ConfigError
from tuneforge.federated import fedkseed, slora
from tuneforge.federated.config import FederatedSettings, PrivacySettings, parse_federated_config
from tuneforge.federated.data import client_train_config, global_eval_config, local_data_config
from tuneforge.federated.updates import (
    compress_update,
    decompress_update,
    state_arrays,
    trained_keys,
    update_problem,
    weighted_average,
)
from tuneforge.fileio import atomic_write_json
from tuneforge.train.data_setup import load_split
from tuneforge.train.update_rules.base import trainable_params

ADAPTER_NAME = "default"  # the name tuneforge.train gives the adapter it trains
GLOBAL_ADAPTER = Path("<global adapter>")  # how load errors name the server's arrays


# ----------------------------------------------------------------------------------------------------
# what travels


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def as_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(value.copy()) for key, value in arrays.items()}


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serialises it for the wire: every object of its tree."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


# ----------------------------------------------------------------------------------------------------
# client


client_app = ClientApp()


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    from tuneforge.train import train

    config, settings, round_number = _sent_config(msg)
    partition_id = _partition_id(context, settings)
    workdir = _client_workdir(context, partition_id)
    client_config = _client_config(config, settings, context, partition_id)
    # each round and client its own data order and dropout, all reproducible from the config's seed
    seed = config.training.seed + 1000 * round_number + partition_id
    training = client_config.training.model_copy(update={"seed": seed})
    client_config = client_config.model_copy(update={"training": training})
    if settings.method == "fedkseed":
        return _seed_client_train(msg, client_config, settings, partition_id)
    global_state = as_tensors(from_record(msg.content["arrays"]))
    trained = {}

    def start_from_global(model: torch.nn.Module) -> None:
        fill_adapter_weights(model, ADAPTER_NAME, global_state, GLOBAL_ADAPTER)
        trained["model"] = model

    summary = train(client_config, overwrite=True, prepare_adapter=start_from_global)
    model = trained["model"]
    examples = len(load_split(client_config, client_config.data.train, "train")[0])
    update = state_arrays(model, ADAPTER_NAME, trained_keys(model, ADAPTER_NAME))
    if settings.compress_density is not None:
        update = compress_update(update, {k: v.numpy() for k, v in global_state.items()}, settings.compress_density)
    metrics = {"num-examples": examples, "train-loss": float(summary.final_train_loss or 0.0),
               "partition-id": partition_id}
    return Message(RecordDict({"arrays": to_record(update), "metrics": MetricRecord(metrics)}), reply_to=msg)


def _seed_client_train(msg: Message, client_config: TrainConfig, settings: FederatedSettings,
                       partition_id: int) -> Message:
    """FedKSeed: rebuild the global model from the sent seed coefficients, take MeZO steps on seeds
    drawn from the shared candidates, and send back only the (seed index, scalar) pairs."""
    from tuneforge.train import train

    coefficients = from_record(msg.content["arrays"])[fedkseed.COEFFICIENTS]
    seeds = fedkseed.candidate_seeds(settings.seed, settings.seeds)
    draws = np.random.default_rng([client_config.training.seed, partition_id])
    built = {}

    def start_from_global(model: torch.nn.Module) -> None:
        fedkseed.replay(trainable_params(model), seeds, coefficients)

    def seed_rule(model, config, full_finetune):
        built["rule"] = fedkseed.CandidateSeedSPSA(model, config, seeds, draws)
        return built["rule"]

    summary = train(client_config, overwrite=True, prepare_adapter=start_from_global, make_update_rule=seed_rule)
    examples = len(load_split(client_config, client_config.data.train, "train")[0])
    metrics = {"num-examples": examples, "train-loss": float(summary.final_train_loss or 0.0),
               "partition-id": partition_id}
    return Message(RecordDict({"arrays": to_record(built["rule"].upload()), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    config, settings, _ = _sent_config(msg)
    partition_id = _partition_id(context, settings)
    client_config = _client_config(config, settings, context, partition_id)
    loss, count = _evaluate(client_config, settings, from_record(msg.content["arrays"]))
    metrics = {"num-examples": count, "eval-loss": loss, "partition-id": partition_id}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _sent_config(msg: Message) -> tuple[TrainConfig, FederatedSettings, int]:
    sent = msg.content["config"]
    config, settings = parse_federated_config(json.loads(str(sent["tuneforge-config"])), "config sent by the server")
    return config, settings, int(sent["server-round"])


def _partition_id(context: Context, settings: FederatedSettings) -> int:
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ConfigError("this SuperNode has no partition: start it with "
                          "--node-config 'partition-id=<i> num-partitions=<clients>'")
    partition_id, partitions = int(node["partition-id"]), int(node["num-partitions"])
    if partitions != settings.clients or not 0 <= partition_id < partitions:
        raise ConfigError(f"node config partition-id={partition_id} num-partitions={partitions} does not fit "
                          f"federated.clients={settings.clients} (partition-id must be 0..{settings.clients - 1})")
    return partition_id


def _client_config(config: TrainConfig, settings: FederatedSettings, context: Context, partition_id: int):
    """This client's train config: its partition of the pooled sources, or (node config ``data``, and
    optionally ``eval-data``) files that exist only on this machine, used whole."""
    workdir = _client_workdir(context, partition_id)
    local = context.node_config.get("data")
    if local:
        local_eval = context.node_config.get("eval-data")
        return local_data_config(config, str(local), str(local_eval) if local_eval else None, workdir)
    return client_train_config(config, settings, partition_id, workdir)


def _client_workdir(context: Context, partition_id: int) -> Path:
    chosen = context.node_config.get("workdir")
    base = Path(str(chosen)) if chosen else Path(tempfile.gettempdir()) / "tuneforge-federated"
    return base / f"client-{partition_id}"


def _evaluate(config: TrainConfig, settings: FederatedSettings, arrays: dict[str, np.ndarray]) -> tuple[float, int]:
    """Mean eval loss per labelled token of the global model ``arrays`` stand for on ``config``'s eval data."""
    from tuneforge.eval.loss import evaluate_loss
    from tuneforge.train.data_setup import prepare_data

    loaded = _global_model(config, settings)
    _load_global(loaded.model, settings, arrays)
    data = prepare_data(config, loaded.tokenizer)
    if not data.eval_batches:
        return float("nan"), 0
    loss = evaluate_loss(loaded.model, data.eval_batches, config.training.precision, config.training.loss_chunk_size)
    return loss, len(data.eval_examples)


def _global_model(config: TrainConfig, settings: FederatedSettings):
    """The base model on the training device, with the adapter at its seeded init (FedAvg, FFA-LoRA) or,
    for FedKSeed, the trainable weights of a full finetune selected (the seeds replay onto those)."""
    from tuneforge.models import load_model
    from tuneforge.train.full import select_trainable
    from tuneforge.train.strategy import resolve_device

    loaded = load_model(config.model, dtype=config.dtype, device=str(resolve_device(config.device)))
    if settings.method == "fedkseed":
        select_trainable(loaded.model, config.adapter)
    else:
        torch.manual_seed(config.training.seed)  # the same init a lone tuneforge.train run would start from
        add_adapter(loaded.model, config.adapter, ADAPTER_NAME)
    return loaded


def _load_global(model: torch.nn.Module, settings: FederatedSettings, arrays: dict[str, np.ndarray]) -> None:
    """Put the global model ``arrays`` stand for into ``model`` (built by ``_global_model``)."""
    if settings.method == "fedkseed":
        seeds = fedkseed.candidate_seeds(settings.seed, settings.seeds)
        fedkseed.replay(trainable_params(model), seeds, arrays[fedkseed.COEFFICIENTS])
    else:
        fill_adapter_weights(model, ADAPTER_NAME, as_tensors(arrays), GLOBAL_ADAPTER)


# ----------------------------------------------------------------------------------------------------
# server


class ScreenedFedAvg(FedAvg):
    """Flower's FedAvg, with every reply screened first: a reply whose arrays do not have the adapter's
    keys, shapes and finite float values is rejected (logged, counted) rather than averaged in. Only the
    trained keys come back (FFA-LoRA: B only); the rest of the global adapter is kept as it was."""

    def __init__(self, *, expected: dict[str, tuple[int, ...]], privacy: PrivacySettings | None = None,
                 compressed: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.compressed = compressed
        self.expected = expected
        self.privacy = privacy
        self.global_arrays: dict[str, np.ndarray] = {}
        self.rounds: dict[int, dict] = {}

    def configure_train(self, server_round, arrays, config, grid):
        self.global_arrays = from_record(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.rounds[server_round] = {"down_bytes": {str(m.metadata.dst_node_id): content_bytes(m.content)
                                                    for m in messages},
                                     "up_bytes": {}, "failures": [], "rejected": [], "clients": {}}
        return messages

    def aggregate_train(self, server_round, replies):
        record = self.rounds[server_round]
        accepted, weights = [], []
        for reply in replies:
            node = str(reply.metadata.src_node_id)
            if reply.has_error():
                record["failures"].append({"node": node, "reason": reply.error.reason})
                log(WARNING, "round %s: client on node %s failed: %s", server_round, node, reply.error.reason)
                continue
            record["up_bytes"][node] = content_bytes(reply.content)
            problem, arrays = self._decoded(reply.content)
            if problem is not None:
                record["rejected"].append({"node": node, "reason": problem})
                log(WARNING, "round %s: update from node %s rejected: %s", server_round, node, problem)
                continue
            accepted.append(arrays)
            weights.append(float(reply.content["metrics"]["num-examples"]))
            record["clients"][node] = dict(reply.content["metrics"])
        log(INFO, "round %s: %s update(s) averaged, %s failed, %s rejected", server_round, len(accepted),
            len(record["failures"]), len(record["rejected"]))
        if len(accepted) < self.min_train_nodes:
            raise RuntimeError(f"round {server_round}: only {len(accepted)} usable update(s), "
                               f"federated.min_clients={self.min_train_nodes} needed")
        return to_record(self._combine(accepted, weights, record)), MetricRecord({"clients-averaged": len(accepted)})

    def _combine(self, accepted: list[dict[str, np.ndarray]], weights: list[float], record: dict) -> dict:
        """The next global arrays from the accepted updates (the keys no client sends are kept)."""
        merged = dict(self.global_arrays)
        if self.privacy is None:
            merged.update(weighted_average(accepted, weights))
        else:
            merged.update(self._private_average(accepted, record))
        return merged

    def _decoded(self, content: RecordDict) -> tuple[str | None, dict[str, np.ndarray] | None]:
        """(why the reply is unusable, None) or (None, the tensors it stands for)."""
        problem = _reply_problem(content)
        if problem is not None:
            return problem, None
        try:
            arrays = from_record(content["arrays"])
            if self.compressed:
                arrays = decompress_update(arrays, self.global_arrays, self.expected)
        except Exception as exc:  # a payload that cannot be turned back into tensors
            return f"arrays cannot be decoded: {exc}", None
        return update_problem(arrays, self.expected), arrays

    def _private_average(self, accepted: list[dict[str, np.ndarray]], record: dict) -> dict[str, np.ndarray]:
        """Flower's fixed-clipping DP primitives on the trained keys (its DP strategy wrappers zip arrays by
        position, which the B-only replies of FFA-LoRA do not match, and skip a round on any client error)."""
        clipping_norm, sigma = self.privacy.clipping_norm, self.privacy.noise_multiplier
        clipped = []
        for update in accepted:
            keys = sorted(update)
            arrays = [update[k] for k in keys]
            compute_clip_model_update(arrays, [self.global_arrays[k] for k in keys], clipping_norm)
            clipped.append(dict(zip(keys, arrays)))
        # equal weights: the noise is calibrated to one client's bounded share of the average
        averaged = weighted_average(clipped, [1.0] * len(clipped))
        noise_std = compute_stdv(sigma, clipping_norm, len(clipped))
        noisy = [averaged[k] for k in sorted(averaged)]
        add_gaussian_noise_inplace(noisy, noise_std)
        record["privacy"] = {"clipping_norm": clipping_norm, "noise_std": noise_std}
        return dict(zip(sorted(averaged), noisy))

    def configure_evaluate(self, server_round, arrays, config, grid):
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        record = self.rounds.setdefault(server_round, {})
        record["eval_down_bytes"] = {str(m.metadata.dst_node_id): content_bytes(m.content) for m in messages}
        return messages

    def aggregate_evaluate(self, server_round, replies):
        record = self.rounds.setdefault(server_round, {})
        for reply in replies:
            if not reply.has_error():
                node = str(reply.metadata.src_node_id)
                record.setdefault("client_eval", {})[node] = dict(reply.content["metrics"])
                record.setdefault("eval_up_bytes", {})[node] = content_bytes(reply.content)
        return None


class SeedReplayStrategy(ScreenedFedAvg):
    """FedKSeed's server: the global arrays are the K seed coefficients c; each accepted upload of
    (seed index, projected gradient, lr) entries is added into c with its FedAvg weight
    (``fedkseed.accumulate``); a malformed upload is rejected like any other."""

    def __init__(self, *, seed_count: int, n_spsa: int, **kwargs):
        super().__init__(expected={}, **kwargs)
        self.seed_count, self.n_spsa = seed_count, n_spsa

    def _decoded(self, content: RecordDict) -> tuple[str | None, dict[str, np.ndarray] | None]:
        problem = _reply_problem(content)
        if problem is not None:
            return problem, None
        upload = from_record(content["arrays"])
        return fedkseed.upload_problem(upload, self.seed_count), upload

    def _combine(self, accepted: list[dict[str, np.ndarray]], weights: list[float], record: dict) -> dict:
        coefficients = self.global_arrays[fedkseed.COEFFICIENTS]
        return {fedkseed.COEFFICIENTS: fedkseed.accumulate(coefficients, accepted, weights, self.n_spsa)}


def _reply_problem(content: RecordDict) -> str | None:
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        return "the reply has no `arrays` ArrayRecord or no `metrics` MetricRecord"
    weight = content["metrics"].get("num-examples")
    if not isinstance(weight, (int, float)) or weight <= 0:
        return f"num-examples={weight!r} is not a positive number"
    return None


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    config_path = str(context.run_config["config"])
    results_path = Path(str(context.run_config["results"]))
    raw = load_config_file(config_path)
    _, settings = parse_federated_config(raw, config_path)
    workdir = results_path.parent / "global"
    report = {"method": settings.method, "clients": settings.clients, "global_eval_loss": {},
              "global_exact_match": {}, "rounds": {}}
    if settings.method == "slora":
        sparse_rounds = settings.slora_sparse_rounds
        sparse = _run_stage(grid, slora.sparse_stage_config(raw, settings.slora_density, settings.seed), sparse_rounds,
                            workdir, report, config_path)

        def svd_init(model: torch.nn.Module) -> dict[str, np.ndarray]:
            return slora.svd_lora_init(sparse, state_arrays(model, ADAPTER_NAME), slora.lora_scalings(model, ADAPTER_NAME))

        final = _run_stage(grid, slora.lora_stage_config(raw), settings.rounds - sparse_rounds, workdir, report,
                           config_path, round_offset=sparse_rounds, initial_from=svd_init)
    else:
        final = _run_stage(grid, raw, settings.rounds, workdir, report, config_path)
    if settings.privacy is not None:
        from tuneforge.federated.accounting import privacy_report

        trained_rounds = sum(1 for record in report["rounds"].values() if record.get("clients"))
        report["privacy"] = privacy_report(settings.privacy.clipping_norm, settings.privacy.noise_multiplier,
                                           settings.privacy.delta, trained_rounds)
    np.savez(results_path.parent / "global_adapter.npz", **final)
    atomic_write_json(results_path, report)


def _run_stage(grid: Grid, raw: dict, rounds: int, workdir: Path, report: dict, source: str, *, round_offset: int = 0,
               initial_from=None) -> dict[str, np.ndarray]:
    """``rounds`` Flower rounds of the federation ``raw`` describes, recorded in ``report`` as rounds
    ``round_offset + 1...``; returns the final global arrays. ``initial_from(model)`` replaces the
    round-0 arrays (SLoRA's SVD initialisation)."""
    config, settings = parse_federated_config(raw, source)
    model, tokenizer, eval_batches, eval_examples, initial, keys = _server_model(config, settings, workdir)
    if initial_from is not None:
        initial = initial_from(model)
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=settings.clients,
                  min_train_nodes=settings.required_replies(), min_evaluate_nodes=settings.required_replies())
    if settings.method == "fedkseed":
        strategy = SeedReplayStrategy(seed_count=settings.seeds, n_spsa=config.update_rule.n_spsa, **common)
        replayed = fedkseed.GlobalModel(model, fedkseed.candidate_seeds(settings.seed, settings.seeds))
    else:
        strategy = ScreenedFedAvg(expected={k: initial[k].shape for k in keys}, privacy=settings.privacy,
                                  compressed=settings.compress_density is not None, **common)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if not eval_batches:
            return None
        from tuneforge.eval.loss import evaluate_loss

        if settings.method == "fedkseed":
            replayed.materialise(from_record(arrays)[fedkseed.COEFFICIENTS])
        else:
            fill_adapter_weights(model, ADAPTER_NAME, as_tensors(from_record(arrays)), GLOBAL_ADAPTER)
        metrics = {"eval-loss": evaluate_loss(model, eval_batches, config.training.precision,
                                              config.training.loss_chunk_size)}
        scored = [e for e in eval_examples[: settings.accuracy_examples] if e.answer is not None]
        if scored:
            from tuneforge.eval.generation import score_generation

            score = score_generation(model, tokenizer, scored, template=config.data.template, progress=False)
            metrics["exact-match"] = score.exact_match
        if server_round == 0 and round_offset:  # a later stage's start (SLoRA: the SVD-initialised LoRA)
            report.setdefault("stage_start", {})[str(round_offset)] = metrics
        else:
            report["global_eval_loss"][str(round_offset + server_round)] = metrics["eval-loss"]
            if "exact-match" in metrics:
                report["global_exact_match"][str(round_offset + server_round)] = metrics["exact-match"]
        return MetricRecord(metrics)

    sent = ConfigRecord({"tuneforge-config": json.dumps(raw)})
    result = strategy.start(grid=grid, initial_arrays=to_record(initial), num_rounds=rounds,
                            timeout=settings.round_timeout_s, train_config=sent, evaluate_config=sent,
                            evaluate_fn=evaluate_global)
    for server_round, record in strategy.rounds.items():
        report["rounds"][str(round_offset + server_round)] = record
    return from_record(result.arrays)


def _server_model(config: TrainConfig, settings: FederatedSettings, workdir: Path):
    """The round-0 global model and arrays (the adapter at its seeded init; for FedKSeed, all seed
    coefficients zero), and the union eval batches the global model is scored on each round."""
    from tuneforge.train.data_setup import prepare_data

    loaded = _global_model(config, settings)
    eval_config, eval_examples = global_eval_config(config, settings, workdir)
    eval_batches = prepare_data(eval_config, loaded.tokenizer).eval_batches if eval_config else []
    if settings.method == "fedkseed":
        initial = {fedkseed.COEFFICIENTS: np.zeros(settings.seeds, np.float32)}
        return loaded.model, loaded.tokenizer, eval_batches, eval_examples, initial, [fedkseed.COEFFICIENTS]
    return (loaded.model, loaded.tokenizer, eval_batches, eval_examples, state_arrays(loaded.model, ADAPTER_NAME),
            trained_keys(loaded.model, ADAPTER_NAME))
