"""How the loop runs on one process or on several (torchrun / ``tuneforge train --nproc N``).

The loop asks its strategy to take this worker's rows of a micro-batch (``my_rows``), place them
(``to_device``), run the forward pass (``forward``), say whether a backward pass should
synchronise gradients (``sync_gradients``), reduce sums across workers (``reduce_sum``) and whether
this worker writes files (``is_main``). The loop is the same for one process and for many.

Data parallelism (``DataParallel``) is PyTorch's DistributedDataParallel (Li et al. 2020, "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training", VLDB): each rank holds the whole
model, computes gradients on its share of the rows and the gradients are all-reduced bucket by
bucket during backward. What this module adds on top:

* Sharding. ``training.batch_size`` is the *global* micro-batch. Every rank builds the same batch
  plan (a pure function of the seed and epoch) and takes rows ``[rank * b, (rank + 1) * b)`` of each
  global micro-batch, ``b = batch_size / world_size``. So the global batches, and the run, are the
  same whatever the world size, and a checkpoint resumes on another world size.
* Exact reductions. The loss of a step is ``sum over ranks of the labelled-token loss sums / sum
  over ranks of the labelled tokens``. Each rank back-propagates its own sum divided by the global
  count, so the true gradient is the *sum* of the ranks' gradients: the DDP communication hook here
  all-reduces with SUM instead of DDP's default average.
* Accumulation. Backward passes of all but the last micro-batch of a step run under ``no_sync``:
  gradients accumulate locally and are all-reduced once per optimizer step.

Fully sharded data parallelism (``FullyShardedDataParallel``) is FSDP2, ``fully_shard`` on a 1-D
DeviceMesh (Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel",
VLDB; the ZeRO-3 scheme of Rajbhandari et al. 2020, "ZeRO", SC'20 §5): each rank keeps 1/W of
every weight, gradient and AdamW moment as a DTensor shard (dim 0). Each decoder layer is its own
unit -- its weights are all-gathered just before its forward and its gradients reduce-scattered
right after its backward -- and the root unit holds the rest (embeddings, final norm, LM head). The
same sharding, summing and ``no_sync`` rules as DDP apply (reduce-scatter with SUM; gradient sync
off while accumulating). ``distributed.fsdp.reshard_after_forward`` frees a layer's gathered weights
after its forward (ZeRO-3) or keeps them until its backward (ZeRO-2-like: fewer all-gathers, more
memory). ``distributed.fsdp.replicas > 1`` makes the mesh 2-D, replicas x (W / replicas): hybrid
sharding (HSDP, Zhao et al. 2023 §3.2.2), where each replica group shards the model among its own
ranks and the groups all-reduce the sharded gradients -- so with one group per node the all-gathers
and reduce-scatters never leave a node. ``distributed.fsdp.cpu_offload`` keeps the shards of the
weights, gradients and AdamW state in CPU memory (FSDP2's ``CPUOffloadPolicy``): the optimizer step
runs on the CPU, and each unit's shards are copied to the device for its all-gather.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn

from tuneforge.errors import ConfigError


class SingleProcess:
    world_size = 1
    rank = 0
    is_main = True
    shards_state = False  # FSDP: every rank holds part of the weights and writes its part of a checkpoint

    def __init__(self, device: torch.device):
        self.device = device

    def my_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def prepare(self, model: nn.Module, fill=None) -> None:
        """Called once the trainable parameters are final, before the optimizer is built."""

    def forward(self, loss_fn, model: nn.Module, batch: dict[str, torch.Tensor]):
        return loss_fn(model, batch)

    def sync_gradients(self, sync: bool):
        return nullcontext()

    def reduce_sum(self, value: float) -> float:
        return value

    def run(self, work, model: nn.Module):
        """``work(model)`` outside training (evaluation, generation); FSDP gathers the weights it needs."""
        return work(model)

    def gather_full_weights(self, model: nn.Module) -> None:
        """Before the final save: make rank 0's ``model`` hold whole tensors (FSDP; a no-op otherwise)."""

    def close(self) -> None:
        pass

    def layout_note(self) -> str | None:
        """How the work is laid out across processes, for the run's first lines; None in one process."""
        return None


class _LossForward(nn.Module):
    """Runs ``loss_fn(model, batch)`` as the module's forward, so DDP sees every training forward.

    The loop's objectives call parts of the model (the backbone, then the LM head in chunks), not
    ``model(...)``; DDP only prepares its gradient reduction for forwards that go through it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss_fn, batch):
        return loss_fn(self.model, batch)


def _sum_allreduce(process_group, bucket):
    """DDP communication hook: sum the ranks' gradients (each rank's loss is already divided by the
    global labelled-token count, so the sum is the gradient of the global mean)."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class DataParallel(SingleProcess):
    """DistributedDataParallel over ``world_size`` processes; see the module docstring."""

    def __init__(self, device: torch.device, rank: int, world_size: int):
        super().__init__(device)
        self.rank = rank
        self.world_size = world_size
        self.is_main = rank == 0
        self._ddp: nn.Module | None = None

    def my_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = next(iter(batch.values())).shape[0]
        share = rows // self.world_size  # divisibility is checked before anything loads
        start = self.rank * share
        return {key: value[start:start + share] for key, value in batch.items()}

    def prepare(self, model: nn.Module, fill=None) -> None:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Construction broadcasts rank 0's parameters and buffers, so every rank starts identical.
        self._ddp = DistributedDataParallel(_LossForward(model), device_ids=device_ids)
        self._ddp.register_comm_hook(None, _sum_allreduce)

    def forward(self, loss_fn, model: nn.Module, batch: dict[str, torch.Tensor]):
        return self._ddp(loss_fn, batch)

    def sync_gradients(self, sync: bool):
        return nullcontext() if sync else self._ddp.no_sync()

    def reduce_sum(self, value: float) -> float:
        total = torch.tensor([float(value)], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(total)
        return float(total.item())

    def layout_note(self) -> str | None:
        return f"DDP over {self.world_size} ranks"

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        shutdown_process_group()


class FullyShardedDataParallel(DataParallel):
    """FSDP2 over ``world_size`` processes; see the module docstring."""

    shards_state = True

    def __init__(self, device: torch.device, rank: int, world_size: int, reshard_after_forward: bool = True,
                 replicas: int = 1, cpu_offload: bool = False):
        super().__init__(device, rank, world_size)
        self.reshard_after_forward = reshard_after_forward
        self.replicas = replicas
        self.shards = world_size // replicas  # ranks per replica group
        self.cpu_offload = cpu_offload
        self._root: nn.Module | None = None

    def _mesh(self):
        """1-D over every rank (FSDP), or replicas x shards with named dimensions (HSDP)."""
        from torch.distributed.device_mesh import init_device_mesh

        if self.replicas == 1:
            return init_device_mesh(self.device.type, (self.world_size,))
        return init_device_mesh(self.device.type, (self.replicas, self.shards),
                                mesh_dim_names=("replicate", "shard"))

    def _offload_policy(self):
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

        if not self.cpu_offload:
            return OffloadPolicy()
        return CPUOffloadPolicy(pin_memory=self.device.type == "cuda")  # pinning needs an accelerator

    def layout_note(self) -> str | None:
        if self.replicas == 1:
            layout = f"FSDP over {self.world_size} ranks"
        else:
            layout = f"HSDP: {self.replicas} replica groups x {self.shards} shards"
        return layout + ("; shards offloaded to CPU memory" if self.cpu_offload else "")

    @property
    def shard_device(self) -> torch.device:
        """Where the shards live: the CPU when offloaded, else this rank's device."""
        return torch.device("cpu") if self.cpu_offload else self.device

    def prepare(self, model: nn.Module, fill=None) -> None:
        """Shard ``model``. ``fill(model, device)``: the model has meta parameters, and fill gives the
        shards storage and reads each rank's rows (train/sharded_load.py)."""
        from torch.distributed.fsdp import fully_shard

        from tuneforge.train.compile import decoder_layers

        if fill is None:
            _sync_initial_weights(model)  # fully_shard keeps each rank's own values: start from rank 0's
        options = {"mesh": self._mesh(), "mp_policy": mixed_precision_policy(model),
                   "offload_policy": self._offload_policy()}
        for layer in decoder_layers(model) or []:
            fully_shard(layer, reshard_after_forward=self.reshard_after_forward, **options)
        # The root wraps the model the way DDP's does: the objectives call the backbone and the LM head
        # separately, and the root's forward is where FSDP gathers the parameters outside the layers.
        root = fully_shard(_LossForward(model), **options)
        if fill is not None:
            fill(model, self.shard_device)
        _sum_gradients(root)
        self._root = root

    def forward(self, loss_fn, model: nn.Module, batch: dict[str, torch.Tensor]):
        return self._root(loss_fn, batch)

    def sync_gradients(self, sync: bool):
        return _gradient_sync(self._root, sync)

    def run(self, work, model: nn.Module):
        with torch.no_grad():
            return self._root(lambda inner, _: work(inner), None)

    def gather_full_weights(self, model: nn.Module) -> None:
        """All ranks gather; rank 0 gets every weight whole on the CPU and swaps it in for its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            _replace_parameters(model, whole)


def _sum_gradients(root: nn.Module) -> None:
    """Reduce-scatter with SUM in every unit (each loss is already over the global token count).
    Divide factor 1 alone would be a PREMUL_SUM, which gloo lacks; forcing SUM works on gloo and NCCL."""
    from torch.distributed.fsdp import FSDPModule

    for module in root.modules():
        if isinstance(module, FSDPModule):  # the setters act on one unit's parameter groups only
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


@contextmanager
def _gradient_sync(root: nn.Module, sync: bool):
    """FSDP's ``no_sync``: without sync the gradients stay unsharded and accumulate on each rank."""
    root.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def mixed_precision_policy(model: nn.Module):
    """A float32 adapter beside a bf16/fp16 base (LoRA): FSDP2 gathers one dtype per unit, so every
    weight is computed in the base's dtype while the float32 shards are what AdamW updates, and
    gradients are reduced in float32. A model of one dtype needs no policy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtypes = {param.dtype for param in model.parameters()}
    if len(dtypes) == 1:
        return MixedPrecisionPolicy()
    low = [dtype for dtype in (torch.bfloat16, torch.float16) if dtype in dtypes]
    if not low:
        raise ConfigError(f"FSDP needs one compute dtype per layer; this model mixes {sorted(map(str, dtypes))}. "
                          "Load the base as float32 or bfloat16 (dtype:).")
    return MixedPrecisionPolicy(param_dtype=low[0], reduce_dtype=torch.float32)


def _sync_initial_weights(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (DDP's constructor does the same)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def _replace_parameters(model: nn.Module, whole: dict[str, torch.Tensor]) -> None:
    """Swap each sharded parameter for its whole tensor; tied parameters stay one Parameter."""
    swap_parameters(model, lambda name, param: nn.Parameter(whole[name], requires_grad=param.requires_grad))


def swap_parameters(model: nn.Module, make) -> None:
    """Replace every parameter by ``make(name, parameter)`` (None keeps it). A parameter several modules
    share (tied embeddings) is made once, under its first name, and stays shared."""
    made: dict[int, nn.Parameter | None] = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if id(param) not in made:
            made[id(param)] = make(name, param)
        if made[id(param)] is not None:
            owner_name, _, attribute = name.rpartition(".")
            model.get_submodule(owner_name)._parameters[attribute] = made[id(param)]


def shutdown_process_group() -> None:
    """End this process's part in the job (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun (or ``tuneforge train --nproc``) set it; 1 for a plain process."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"the environment variable WORLD_SIZE={value!r} is not a positive whole number; it is set "
                          "by torchrun: unset it to train in one process")
    return int(value)


def check_distributed(config, world_size: int) -> None:
    """Every refusal that depends on the world size, before anything loads: raised the same on every rank."""
    if world_size == 1:
        return
    problems = []
    training = config.training
    if training.batch_size % world_size:
        problems.append(
            f"training.batch_size={training.batch_size} is the global micro-batch, split evenly across the "
            f"{world_size} processes; {world_size} does not divide it. Use a batch_size that is a multiple of "
            f"{world_size} (e.g. {world_size * max(1, training.batch_size // world_size)}) or another number of processes.")
    if chosen_strategy(config) == "fsdp":
        problems.extend(_fsdp_problems(config, world_size))
    if training.objective != "sft":
        problems.append(f"training.objective={training.objective!r} is not tested on several processes yet; "
                        "run it in one process or use objective: sft")
    if config.update_rule.method != "optimizer":
        problems.append(f"update_rule.method={config.update_rule.method!r} is not supported on several processes "
                        "(see docs/distributed.md); use update_rule.method: optimizer or run in one process")
    if config.data.select is not None:
        problems.append("data.select runs in one process: select first (`tuneforge select`), then train on the "
                        "selected file without data.select")
    method_problem = _method_problem(config.adapter)
    if method_problem:
        problems.append(method_problem)
    if problems:
        raise ConfigError(f"{world_size} processes (WORLD_SIZE={world_size}): " + "; ".join(problems))


def chosen_strategy(config) -> str:
    """``distributed.strategy`` with auto resolved: FSDP2 when the model's own weights train (their
    AdamW state is what outgrows a device), DDP for an adapter (small; DDP needs no gathering)."""
    strategy = config.distributed.strategy
    if strategy != "auto":
        return strategy
    from tuneforge.train.full import is_full_finetune

    return "fsdp" if is_full_finetune(config.adapter) else "ddp"


def _fsdp_problems(config, world_size: int) -> list[str]:
    problems = []
    replicas = config.distributed.fsdp.replicas
    if world_size % replicas:
        problems.append(f"distributed.fsdp.replicas={replicas} must divide the {world_size} processes into equal "
                        "replica groups; set it to the number of nodes, or 1 for plain FSDP")
    if config.quantization is not None:
        problems.append("QLoRA (quantization:) does not run under FSDP: sharding turns the 4-bit weights into plain "
                        "tensors, which saves nothing. Use distributed.strategy: ddp (the frozen 4-bit base is not "
                        "communicated) or run in one process")
    if config.training.compile:
        problems.append("training.compile is not tested under FSDP; set it to false or use distributed.strategy: ddp")
    if config.training.optimizer != "adamw":
        problems.append(f"training.optimizer={config.training.optimizer!r} keeps quantized state that is not tested on "
                        "FSDP's sharded weights; use optimizer: adamw or distributed.strategy: ddp")
    return problems


def _method_problem(adapter) -> str | None:
    """Methods with training hooks or model-level wrapping are refused until tested (docs/distributed.md)."""
    if adapter.method == "full":
        return None
    from tuneforge.adapters import get_method
    from tuneforge.adapters.lora.inits import DATA_DRIVEN_INITS

    spec = get_method(adapter.method)
    if spec.attach is not None:
        return (f"adapter.method={adapter.method!r} is a model-level method, not tested on several processes yet; "
                "run it in one process")
    plain_lora = spec.name == "lora" and getattr(adapter, "init", None) not in DATA_DRIVEN_INITS
    if spec.hooks is not None and not plain_lora:
        what = f"adapter.init={adapter.init!r}" if spec.name == "lora" else f"adapter.method={adapter.method!r}"
        return (f"{what} runs training hooks (data-driven init, rank allocation, masks) that are not tested on "
                "several processes yet; run it in one process")
    return None


def pick_strategy(device: torch.device, config) -> SingleProcess:
    """One process, or DDP / FSDP2 over the processes torchrun started (after ``check_distributed``)."""
    world_size = launched_world_size()
    if world_size == 1:
        return SingleProcess(device)
    check_distributed(config, world_size)
    rank = int(os.environ.get("RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=config.distributed.timeout_seconds)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    if chosen_strategy(config) == "fsdp":
        fsdp = config.distributed.fsdp
        strategy = FullyShardedDataParallel(device, rank, world_size, fsdp.reshard_after_forward, fsdp.replicas,
                                            fsdp.cpu_offload)
    else:
        strategy = DataParallel(device, rank, world_size)
    try:
        _require_same_config(config, strategy)
    except ConfigError:
        strategy.close()
        raise
    return strategy


def config_fingerprint(config) -> str:
    """A hash of the resolved config: every rank must train the same run."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def _require_same_config(config, strategy: DataParallel) -> None:
    mine = config_fingerprint(config)
    fingerprints: list[str | None] = [None] * strategy.world_size
    dist.all_gather_object(fingerprints, mine)
    differing = [rank for rank, theirs in enumerate(fingerprints) if theirs != fingerprints[0]]
    if differing:
        raise ConfigError(
            f"the processes were given different configs (rank {strategy.rank} has {mine}; ranks "
            f"{', '.join(map(str, differing))} differ from rank 0's {fingerprints[0]}). Start every node with the same "
            "config file and overrides.")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} was asked for, but no CUDA GPU is visible; use device=cpu or auto")
    return torch.device(name)
