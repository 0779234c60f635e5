"""``tuneforge train --nproc N``: torch's elastic launcher on this machine, as ``torchrun --standalone`` would.

Each worker is ``python -m tuneforge train <same arguments>`` with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set by the elastic agent; the rendezvous is a c10d store on localhost
on a free port, so two jobs on one machine do not collide. When one worker fails the agent stops the
others, and this returns the failed worker's exit code.
"""

from __future__ import annotations

import os
import sys
import uuid


def launch_local(nproc: int, train_arguments: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # torchrun sets one thread per worker when it starts several; share the cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"tuneforge-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "tuneforge", "train", *train_arguments)
    except ChildFailedError as exc:
        rank, first = min(exc.failures.items(), key=lambda item: item[1].timestamp)  # the first to fail
        print(f"tuneforge train: rank {rank} failed with exit code {first.exitcode}; the other workers were stopped",
              file=sys.stderr)
        return first.exitcode if first.exitcode > 0 else 1
    return 0
