"""The processes of an `accelerate launch` (or torchrun) run: how many, which one this is, and waiting for the others.

A leaf module (it imports nothing of diffslim), so that every floor can ask. The launchers set ``WORLD_SIZE`` and
``RANK`` before Python starts; the process group is set up on demand, as Accelerate does (over gloo without CUDA).
"""

from __future__ import annotations

import os
from typing import Optional


def world_size() -> int:
    """How many processes run this command; 1 without a launcher."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def is_first() -> bool:
    """Whether this is the launch's first process (the one that prints and writes), or the only one."""
    return os.environ.get("RANK", "0").strip() in ("0", "")


def group():
    """``torch.distributed``, its process group set up, when this process is one of several; else None."""
    if world_size() <= 1:
        return None
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())  # sets the group up if nothing has yet
    return dist if dist.is_initialized() and dist.get_world_size() > 1 else None


def wait_for_everyone() -> None:
    """Wait until every process of the launch gets here (after the first wrote what the others read next); a no-op
    in one process."""
    dist = group()
    if dist is not None:
        dist.barrier()


def first_decides(value):
    """The first process's ``value``, in every process (a decision one process must not make otherwise than the
    others, such as whether a file is there: they would wait for each other forever)."""
    dist = group()
    if dist is None:
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def slowest(seconds: float) -> float:
    """The longest of the processes' ``seconds``, in every process: a launch's wall time is its slowest process's,
    and every process then takes the same decisions from it (the faster of two timings, say)."""
    dist = group()
    if dist is None:
        return seconds
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, seconds)
    return max(every)


def shared_map(fn, items, done=None) -> list:
    """``[fn(x) for x in items]``, each process of a launch computing every ``world``-th item and every process
    receiving all the results, in order (``fn``'s results must pickle). ``done(k)``: called after each of this
    process's items (a progress bar). In one process, the plain loop."""
    items = list(items)
    dist = group()
    if dist is None:
        out = []
        for x in items:
            out.append(fn(x))
            if done is not None:
                done(1)
        return out
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {}
    for k in range(rank, len(items), world):
        mine[k] = fn(items[k])
        if done is not None:
            done(1)
    every = [None] * world
    dist.all_gather_object(every, mine)
    merged = {k: v for part in every for k, v in part.items()}
    return [merged[k] for k in range(len(items))]


def accelerator(mixed_precision: Optional[str] = None, **kwargs):
    """An ``accelerate.Accelerator`` with this mixed precision (None: the launcher's ``--mixed_precision``, else
    "no"), on this process's GPU when torch sees one, else on the CPU (over gloo under a launch). Accelerate keeps one
    state per process and refuses a second ``Accelerator`` with another mixed precision ("restart your runtime"), and
    one built without the argument takes the last run's: in one Python session a bf16 distillation after a DiP-GO run
    failed, and a DiP-GO run after it would have trained under bf16 autocast. A finished run's state is dropped for
    the next one (the process group stays)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if mixed_precision is None:
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and \
            state.get("distributed_type") != DistributedType.DEEPSPEED:  # DeepSpeed's config sets its own precision
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), **kwargs)
