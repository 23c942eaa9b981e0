"""The ranks of a torch.distributed job as the Dr step sees them: who this process is, which units it holds,
how the process group is started under torchrun, and what is refused.

A step's n general and m target units are drawn on every rank alike (the same seeded draw) and split into
contiguous shares, rank r holding units [start_r, stop_r) of each (eq. (1) in theory/distributed.md); a unit
(an SFT example, a DPO pair, a GRPO prompt with its whole group) is never split. Every rank must hold at least one
general and one target unit. Refused with a ValueError that says what to do: a model wrapped in
DistributedDataParallel (the Dr step reduces its own update), FSDP-wrapped or DTensor (FSDP2, tensor-parallel)
parameters, and weight rules (they read one process's capture); theory/distributed.md, section 5, says what
supporting each would take.

Shapes: shares are index ranges; no tensors but the parameters broadcast once (broadcast_parameters).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

COMMS = ("auto", "tokens", "units")  # what the ranks gather per layer (theory/distributed.md, section 2)


@dataclass(frozen=True)
class Ranks:
    """This process among the ranks of a process group (world > 1)."""

    rank: int
    world: int
    group: object = None  # a torch.distributed ProcessGroup; None = the default group

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files, and whose answer of the projection every rank takes."""
        return self.rank == 0


def current_ranks(group=None) -> Ranks | None:
    """The ranks of `group` (default: the default process group), or None outside torch.distributed or when the
    group has one process (then the step is the single-process step, unchanged)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(group)
    return Ranks(dist.get_rank(group), world, group) if world > 1 else None


def share(count: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of `count` units, eq. (1) in theory/distributed.md: the first
    count % world ranks hold one more."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def local_units(items: list, ranks: Ranks | None) -> list:
    """This rank's share of a step's drawn units (all of them outside torch.distributed)."""
    if ranks is None:
        return items
    start, stop = share(len(items), ranks.rank, ranks.world)
    return items[start:stop]


def rank_generator(gen: torch.Generator, ranks: Ranks | None) -> torch.Generator:
    """The sampling generator of this rank: `gen` itself on rank 0 (and outside torch.distributed), a stream
    derived from its seed and the rank elsewhere, so that no two ranks sample alike."""
    if ranks is None or ranks.main:
        return gen
    return torch.Generator(device=gen.device).manual_seed((gen.initial_seed() + ranks.rank * 0x9E3779B97F4A7C15)
                                                          % 2**63)


def check_shares(n: int, m: int, world: int) -> None:
    """Every rank needs one general and one target unit at least (its capture needs both)."""
    if n < world or m < world:
        raise ValueError(f"--n-general {n} and --m-target {m} are split across {world} ranks, and every rank needs "
                         f"at least one general and one target unit: raise both to >= {world} or launch fewer "
                         "processes (torchrun --nproc-per-node).")


def check_model(model) -> None:
    """Refuse what the Dr step cannot reduce exactly: DDP-wrapped models, FSDP, DTensor (sharded) parameters."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise ValueError("the model is wrapped in DistributedDataParallel: the Dr step builds the global Gram and "
                         "all-reduces its own update, so DDP's gradient all-reduce would mix per-rank gradients into "
                         "it; pass the module itself (model.module) under the initialised process group.")
    if any(type(mod).__name__.startswith(("FullyShardedDataParallel", "FSDP")) for mod in model.modules()):
        raise ValueError("the model is FSDP-wrapped: its parameters are sharded across ranks, and the Dr step needs "
                         "every rank to hold the whole of each covered layer (theory/distributed.md, section 5); "
                         "train it unsharded (one copy per rank) or on one process.")
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - every supported torch has it
        DTensor = ()
    sharded = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(f"parameter {sharded[0]} is a DTensor (FSDP2 fully_shard or tensor parallelism): the Dr "
                         "step needs whole, replicated parameters on every rank (theory/distributed.md, section 5).")


def check_rule(rule, ranks: Ranks | None) -> None:
    if rule is not None and ranks is not None:
        raise ValueError(f"weight rule {type(rule).__name__}: under torch.distributed only the projections of "
                         "drpt_ref.METHODS run (a weight rule reads one process's capture and hidden states; "
                         "theory/distributed.md, section 5); use a projection method or one process.")


def sync_model(model, ranks: Ranks | None) -> None:
    """check_model, then broadcast_parameters: a run's model before its first step (nothing on one process)."""
    if ranks is not None:
        check_model(model)
        broadcast_parameters(model, ranks)


def broadcast_parameters(model, ranks: Ranks | None) -> None:
    """Every rank starts from rank 0's parameters and buffers (as DDP does when it wraps a model)."""
    if ranks is None:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=dist.get_global_rank(ranks.group, 0) if ranks.group else 0,
                           group=ranks.group)


def check_run(ranks: Ranks | None, n: int, m: int, rule: str | None) -> None:
    """`drpt train` on several ranks, after every rank has checked its flags and --out: the shares, no weight rule
    (rule: its --method name, None for a projection), then a barrier, so that rank 0 writes only when every rank
    has read --out."""
    if ranks is None:
        return
    check_shares(n, m, ranks.world)
    if rule is not None:
        raise ValueError(f"--method {rule} is a weight rule: under torchrun only the projections of drpt_ref.METHODS "
                         "run (theory/distributed.md, section 5); use one process for it.")
    dist.barrier(group=ranks.group)


@contextmanager
def torchrun_group(device: str):
    """The process group of torchrun's environment for the duration of a run (init_from_env), destroyed at the end
    if this started it. Yields the ranks, or None on one process."""
    ranks, started = init_from_env(device)
    try:
        yield ranks
    finally:
        if started:
            dist.destroy_process_group()


def init_from_env(device: str) -> tuple[Ranks | None, bool]:
    """Start the default process group from torchrun's environment (WORLD_SIZE > 1, RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) when none is running: backend nccl for --device cuda (each rank on cuda:LOCAL_RANK),
    gloo for cpu. -> (the ranks or None, whether this call started the group: then the caller destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return current_ranks(), False
    if device.startswith("cuda"):
        if ":" in device:
            raise ValueError(f"--device {device} under torchrun: each rank uses cuda:LOCAL_RANK; pass --device cuda.")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # 'cuda' is then this rank's device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return current_ranks(), True
