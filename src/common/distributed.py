"""Data parallelism over the processes that torchrun or `accelerate launch` start, through accelerate.

    torchrun --standalone --nproc_per_node 2 -m src.benchmark --device cpu ...      # CPU processes on gloo
    accelerate launch --multi_gpu --num_processes 4 -m src.lenpred ...             # one process per GPU

Each process takes a disjoint, deterministic share of the work (`Processes.share`: every K-th item, so the
shares are fixed by the launch and not by timing) and the main process merges what the others send back.
Without a launcher, or with one process, nothing here starts a process group and the CLIs behave exactly as
before. Only what merges needs to know about processes lives here; the merging rules live with the metrics.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .utils import UserError

Item = TypeVar("Item")


@dataclass(frozen=True)
class Processes:
    """This process's place among the launched ones; a single process when nothing was launched."""

    rank: int = 0
    count: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.count > 1

    def share(self, items: Sequence[Item], size: int) -> list[list[Item]]:
        """Cut `items` into consecutive chunks of `size` (groups, batches) and keep chunks rank, rank + K,
        rank + 2K, ...: a chunk holds the same items whatever K is, and round robin gives K shares of chunks of
        equal cost about equal time even when the number of chunks is not a multiple of K."""
        chunks = [list(items[start : start + size]) for start in range(0, len(items), size)]
        return chunks[self.rank :: self.count]

    def wait(self) -> None:
        """Barrier: every process reaches this line before any goes on."""
        if self.distributed:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process (pickled through the process group)."""
        if not self.distributed:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj`, on every process."""
        if not self.distributed:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def device(self, requested: str) -> str:
        """One GPU per process: `auto` and `cuda` name this process's GPU (its local rank); an explicit
        device, or any device of a single process, is used as given."""
        if not self.distributed or requested not in ("auto", "cuda"):
            return requested
        import torch

        if not torch.cuda.is_available():
            return requested
        if self.local_rank >= torch.cuda.device_count():
            from .utils import UserError

            raise UserError(
                f"process {self.local_rank} of this machine has no GPU of its own ({torch.cuda.device_count()} "
                "visible): launch at most one process per GPU"
            )
        return f"cuda:{self.local_rank}"


def launched_process_count() -> int:
    """How many processes the launcher started (torchrun and `accelerate launch` set WORLD_SIZE)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def start_processes(device: str = "auto") -> Processes:
    """Join the process group that the launcher set up, on gloo for CPU work and nccl for GPUs.

    With one process no group is made, so single-process runs import no distributed machinery.
    """
    if launched_process_count() <= 1:
        return Processes()
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device in ("auto", "cuda") and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    return Processes(state.process_index, state.num_processes, state.local_process_index)


def end_processes(finished: bool = True) -> None:
    """Leave the process group before the interpreter exits: without this, about a third of gloo runs abort at
    exit ("terminate called without an active exception") and the launcher reports a failure. After a run that
    `finished`, the processes wait for each other, so that none leaves while another still talks to it, and
    this process then ends with status 0 (it does not return). After an error they only leave the group
    (the launcher stops the others). Does nothing in a single process."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        if finished:
            try:
                distributed.barrier()
            except RuntimeError:  # a peer is gone: the launcher reports it
                finished = False
        distributed.destroy_process_group()
        if finished:
            # Even after an orderly destroy, about 1 run in 25 still aborted in gloo's C++ teardown at
            # interpreter exit (torch 2.13), turning a finished run's exit status into a failure. Every output
            # is written by now: run the Python exit handlers (loggers, trackers), then end the process
            # without that teardown.
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def share_groups(samples: list, group_size: int, processes: Processes) -> list:
    """This process's samples: whole groups, every K-th one, so each group is scheduled as in one process."""
    groups = -(-len(samples) // group_size)
    if groups < processes.count:
        raise UserError(
            f"{len(samples)} samples make {groups} group(s) of --group-size {group_size}, fewer than the "
            f"{processes.count} processes: use a smaller --group-size or fewer processes"
        )
    return [sample for group in processes.share(samples, group_size) for sample in group]
