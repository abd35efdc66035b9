"""Which process of a distributed run this is, and the collectives the trainer needs.

The one source of truth for rank and world detection. Three launchers are understood, in
this order of precedence:

1. `RANK`/`WORLD_SIZE`/... variables, as `gptrain launch` (gptrain.launch), torchrun and
   submitit's TorchDistributedEnvironment export them ("torchrun" below). Checked first because
   a launcher started inside a Slurm step or a Kubernetes pod still sees that one's variables.
2. Slurm tasks started by `srun` (no launcher): one process per task. Only inside a job step
   (`SLURM_STEP_ID` set): the batch script itself carries SLURM_NTASKS and SLURM_PROCID=0
   too, but it is a single process, and treating it as rank 0 of N would hang forever.
3. Kubernetes Indexed Jobs (no launcher): one process per pod, rank = JOB_COMPLETION_INDEX,
   world size from GPTRAIN_WORLD_SIZE (Kubernetes does not inject `completions`), rank 0
   reached at GPTRAIN_MASTER_ADDR (the headless-service name of the index-0 pod). An Indexed
   Job without GPTRAIN_WORLD_SIZE is a job array (see gptrain.array_task), not a training.

Otherwise the process runs alone. The collectives below are no-ops until
`init_distributed` has created a process group, so single-process code calls them freely.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from gptrain.errors import GptrainError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("gptrain.distributed")

DEFAULT_MASTER_PORT = 29500
# Slurm jobs without MASTER_PORT get 10000 + job id mod 20000: unprivileged, below Linux's
# ephemeral range (32768+) so outgoing connections never hold it, and equal on every task.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 20000


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    launcher: Literal["torchrun", "slurm", "kubernetes", "single"] = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    if "RANK" in environ:
        return _torchrun_env(environ)
    if "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return _slurm_env(environ)
    if "GPTRAIN_WORLD_SIZE" in environ:
        return _kubernetes_env(environ)
    return DistEnv()


def _torchrun_env(environ: Mapping[str, str]) -> DistEnv:
    rank = _int_var(environ, "RANK")
    local_world_size = _int_var(environ, "LOCAL_WORLD_SIZE")
    env = DistEnv(
        rank=rank,
        local_rank=_int_var(environ, "LOCAL_RANK"),
        world_size=_int_var(environ, "WORLD_SIZE"),
        local_world_size=local_world_size,
        # torchrun's GROUP_RANK is the node's rank; other exporters lay ranks out node by node.
        node_rank=_int_var(environ, "GROUP_RANK") if "GROUP_RANK" in environ else rank // max(local_world_size, 1),
        master_addr=_var(environ, "MASTER_ADDR"),
        master_port=_port_var(environ, "MASTER_PORT"),
        launcher="torchrun",
    )
    return _checked(env, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _slurm_env(environ: Mapping[str, str]) -> DistEnv:
    # Within a step, srun exports the step's own task count and node list; prefer them over
    # the job-wide ones in case the step uses only part of the allocation.
    world_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    nodelist_var = next(
        (v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if v in environ), None
    )
    node_rank = _int_var(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
    if "MASTER_ADDR" in environ:
        master_addr = _var(environ, "MASTER_ADDR")
    elif nodelist_var is not None:
        master_addr = expand_hostlist(environ[nodelist_var], nodelist_var)[0]
    else:
        raise GptrainError("Slurm task without SLURM_JOB_NODELIST (or MASTER_ADDR): cannot find rank 0's host")
    if "MASTER_PORT" in environ:
        master_port = _port_var(environ, "MASTER_PORT")
    else:
        master_port = SLURM_PORT_BASE + _int_var(environ, "SLURM_JOB_ID") % SLURM_PORT_SPAN
    local_world_var, local_world_size = _slurm_local_world_size(environ, node_rank)
    env = DistEnv(
        rank=_int_var(environ, "SLURM_PROCID"),
        local_rank=_int_var(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
        world_size=_int_var(environ, world_var),
        local_world_size=local_world_size,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        launcher="slurm",
    )
    return _checked(env, "SLURM_PROCID", world_var, "SLURM_LOCALID", local_world_var)


def _slurm_local_world_size(environ: Mapping[str, str], node_rank: int) -> tuple[str, int]:
    """(the variable it came from, tasks on this node)."""
    if "SLURM_NTASKS_PER_NODE" in environ:
        return "SLURM_NTASKS_PER_NODE", _int_var(environ, "SLURM_NTASKS_PER_NODE")
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if name in environ:
            per_node = expand_tasks_per_node(environ[name], name)
            if node_rank >= len(per_node):
                listed = f"{name}={environ[name]!r} lists {len(per_node)} nodes"
                raise GptrainError(f"{listed}, but SLURM_NODEID is {node_rank}")
            return name, per_node[node_rank]
    return "SLURM_TASKS_PER_NODE", 1


def _kubernetes_env(environ: Mapping[str, str]) -> DistEnv:
    world_size = _int_var(environ, "GPTRAIN_WORLD_SIZE")
    if "JOB_COMPLETION_INDEX" not in environ:
        raise GptrainError("GPTRAIN_WORLD_SIZE is set but JOB_COMPLETION_INDEX is not: run it as an Indexed Job")
    rank = _int_var(environ, "JOB_COMPLETION_INDEX")
    if world_size > 1 and "GPTRAIN_MASTER_ADDR" not in environ:
        raise GptrainError("GPTRAIN_MASTER_ADDR is not set: it must name the host of index 0 (headless service)")
    master_port = DEFAULT_MASTER_PORT
    if "GPTRAIN_MASTER_PORT" in environ:
        master_port = _port_var(environ, "GPTRAIN_MASTER_PORT")
    env = DistEnv(
        rank=rank,
        local_rank=0,
        world_size=world_size,
        local_world_size=1,
        node_rank=rank,
        master_addr=_var(environ, "GPTRAIN_MASTER_ADDR") if "GPTRAIN_MASTER_ADDR" in environ else "127.0.0.1",
        master_port=master_port,
        launcher="kubernetes",
    )
    return _checked(env, "JOB_COMPLETION_INDEX", "GPTRAIN_WORLD_SIZE", "JOB_COMPLETION_INDEX", "GPTRAIN_WORLD_SIZE")


def _checked(env: DistEnv, rank_var: str, world_var: str, local_rank_var: str, local_world_var: str) -> DistEnv:
    if env.world_size < 1:
        raise GptrainError(f"environment variable {world_var}={env.world_size} must be >= 1")
    if not 0 <= env.rank < env.world_size:
        raise GptrainError(
            f"environment variable {rank_var}={env.rank} is outside 0..{world_var}-1 ({env.world_size - 1})"
        )
    if env.local_world_size < 1:
        raise GptrainError(f"environment variable {local_world_var}={env.local_world_size} must be >= 1")
    if not 0 <= env.local_rank < env.local_world_size:
        raise GptrainError(
            f"environment variable {local_rank_var}={env.local_rank} is outside 0..{local_world_var}-1"
            f" ({env.local_world_size - 1})"
        )
    return env


def _var(environ: Mapping[str, str], name: str) -> str:
    if not environ.get(name):
        raise GptrainError(f"environment variable {name} is missing or empty")
    return environ[name]


def _int_var(environ: Mapping[str, str], name: str) -> int:
    text = _var(environ, name)
    try:
        return int(text)
    except ValueError:
        raise GptrainError(f"environment variable {name}={text!r} is not an integer") from None


def _port_var(environ: Mapping[str, str], name: str) -> int:
    port = _int_var(environ, name)
    if not 1 <= port <= 65535:
        raise GptrainError(f"environment variable {name}={port} is not a TCP port")
    return port


_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def expand_hostlist(hostlist: str, variable: str = "hostlist") -> list[str]:
    """Expand a Slurm host list: "gpu[01-03,07],cpu3" -> gpu01 gpu02 gpu03 gpu07 cpu3.

    Each bracket holds comma-separated numbers or ranges (zero padding kept); several
    brackets in one name ("r[1-2]n[1-2]") expand to every combination, in Slurm's order.
    """
    hosts: list[str] = []
    for name in _split_top_level(hostlist, variable):
        hosts.extend(_expand_name(name, hostlist, variable))
    if not hosts:
        raise GptrainError(f"{variable}={hostlist!r} names no hosts")
    return hosts


def _split_top_level(hostlist: str, variable: str) -> list[str]:
    names, depth, start = [], 0, 0
    for i, char in enumerate(hostlist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth not in (0, 1):
            raise GptrainError(f"{variable}={hostlist!r}: unbalanced brackets")
        if char == "," and depth == 0:
            names.append(hostlist[start:i])
            start = i + 1
    if depth:
        raise GptrainError(f"{variable}={hostlist!r}: unbalanced brackets")
    names.append(hostlist[start:])
    return [name.strip() for name in names if name.strip()]


def _expand_name(name: str, hostlist: str, variable: str) -> list[str]:
    match = _BRACKET.search(name)
    if match is None:
        if "[" in name or "]" in name:
            raise GptrainError(f"{variable}={hostlist!r}: unbalanced brackets")
        return [name]
    prefix, numbers = name[: match.start()], _expand_ranges(match.group(1), hostlist, variable)
    suffixes = _expand_name(name[match.end() :], hostlist, variable)
    return [prefix + number + suffix for number in numbers for suffix in suffixes]


def _expand_ranges(ranges: str, hostlist: str, variable: str) -> list[str]:
    numbers = []
    for part in ranges.split(","):
        low, _, high = part.strip().partition("-")
        high = high or low
        if not (low.isdigit() and high.isdigit()) or int(low) > int(high):
            raise GptrainError(f"{variable}={hostlist!r}: bad range {part!r} in brackets")
        numbers.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return numbers


_TASKS_PER_NODE = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def expand_tasks_per_node(value: str, variable: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand Slurm's compressed tasks-per-node list: "2(x3),1" -> [2, 2, 2, 1]."""
    counts = []
    for part in value.split(","):
        match = _TASKS_PER_NODE.match(part.strip())
        if match is None:
            raise GptrainError(f"{variable}={value!r}: expected counts like '2(x3),1'")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


# ---------------------------------------------------------------------------------------------
# Process group and collectives.

_current: DistEnv | None = None  # set by init_distributed, cleared by destroy_distributed


def init_distributed(device_type: str, *, init_timeout_s: float, timeout_s: float) -> DistEnv:
    """Join the process group of this run (gloo on CPU, NCCL on CUDA) when there is more than
    one process; on CUDA also select this process's GPU. Returns the detected environment.

    A rank that cannot join within `init_timeout_s` (rank 0's name never resolves, some rank
    never starts) and, once joined, any collective that takes longer than `timeout_s` (a rank
    lost or hung) raise instead of waiting forever: the process crashes, the launcher stops
    the other ranks and the scheduler restarts the run from its newest checkpoint.
    """
    global _current
    import torch
    import torch.distributed as dist

    if device_type not in ("cpu", "cuda"):
        raise GptrainError(f"device type must be 'cpu' or 'cuda', got {device_type!r}")
    env = detect_env()
    device = None
    if device_type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        # A collective that times out leaves NCCL's flight recorder (the last collectives of
        # every rank) in TORCH_FR_DUMP_TEMP_FILE<rank> (default /tmp/nccl_trace_rank_<rank>),
        # to find the rank that stopped calling them. Read when the NCCL group is created.
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    if env.world_size > 1 and not dist.is_initialized():
        # Node 0 hosts rank 0's store (the rank decides, not a host-name match), so its
        # processes reach it over loopback and never wait for their own DNS name (a Kubernetes
        # pod's name under its headless Service appears some time after the pod starts).
        # Other nodes wait for rank 0's name, within the joining timeout.
        master_addr = "127.0.0.1" if env.node_rank == 0 else env.master_addr
        if env.node_rank != 0:
            _wait_for_name(master_addr, time.monotonic() + init_timeout_s)
        # torch's env:// rendezvous, and libraries running inside the trainer (distributed
        # checkpointing), read these whichever launcher started us.
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(env.master_port), RANK=str(env.rank),
            WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
            LOCAL_WORLD_SIZE=str(env.local_world_size),
        )
        # Joining (connecting to rank 0's store, which waits for every rank, and creating the
        # communicators) runs under the init timeout, every collective after it under the other.
        try:
            dist.init_process_group(
                backend="nccl" if device_type == "cuda" else "gloo", init_method="env://",
                rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=init_timeout_s),
                device_id=device,
            )
        except RuntimeError as err:  # torch's DistNetworkError/DistStoreError: a timeout, a refusal
            raise RuntimeError(
                f"rank {env.rank} of {env.world_size} could not join the process group at "
                f"{master_addr}:{env.master_port} within comm.init_timeout_s={init_timeout_s:g}: "
                f"{str(err).splitlines()[0]}"
            ) from err
        # torch has no public call to change a group's timeout (torchtitan uses this one too).
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s))
    _current = env
    return env


def _wait_for_name(host: str, deadline: float) -> None:
    """Wait until `host` resolves; RuntimeError at `deadline`."""
    logged = False
    while True:
        try:
            socket.getaddrinfo(host, None)
            return
        except socket.gaierror as err:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"rank 0's host {host!r} did not resolve in time: {err}") from None
            if not logged:
                log.info("waiting for rank 0's host %r to resolve (%s)", host, err)
                logged = True
            time.sleep(1.0)


def destroy_distributed() -> None:
    global _current
    if _initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
    _current = None


def current_env() -> DistEnv:
    """The environment init_distributed set up, or (before it) the one detected now."""
    return _current if _current is not None else detect_env()


def is_main() -> bool:
    return current_env().is_main


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place; returns it."""
    if _initialized():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` over all ranks, in place; returns it. (Sum then divide: gloo has no AVG.)"""
    if _initialized():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any: e.g. to stop together when one is preempted."""
    if not _initialized():
        return flag
    import torch
    import torch.distributed as dist

    votes = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (it must pickle)."""
    if not _initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _collective_device() -> torch.device:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":  # NCCL only moves CUDA tensors
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
