"""Process-group set-up that works the same under torchrun, on one GPU, and as a plain `python` process.

    info = distributed.init("auto")          # join torchrun's job, or be a single process; pick this rank's device
    distributed.print0(f"{info.world_size} process(es) on {info.device}")
    ...
    distributed.cleanup()

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). Without them, a process that `srun`
started reads SLURM's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, takes the first host of the job's node list as
MASTER_ADDR and a port derived from the job id as MASTER_PORT (either can be set explicitly). Without either we are a
single process and create no process group at all unless one is required (FSDP needs a device mesh even on one rank). nccl is used
on CUDA, gloo on CPU. Every collective below is the identity on a single process, so callers need no rank checks.
Used by the trainer, sampling and latent extraction alike.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_info = DistInfo(0, 1, 0, torch.device("cpu"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list -> host names: 'gpu[01-03,07],login1' -> gpu01 gpu02 gpu03 gpu07 login1 (zero
    padding kept, several bracket groups per name allowed)."""
    hosts = []
    for name in re.findall(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*", nodelist):
        if not name:
            continue
        m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", name)
        if m is None:
            hosts.append(name)
            continue
        prefix, ranges, rest = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            numbers = range(int(lo), int(hi or lo) + 1)
            hosts += [h for n in numbers for h in expand_nodelist(f"{prefix}{n:0{len(lo)}d}{rest}")]
    return hosts


def slurm_master_addr(nodelist: str) -> str:
    """The first host of a SLURM node list, as `scontrol show hostnames` gives it (parsed here without scontrol)."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        done = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.split():
            return done.stdout.split()[0]
    return expand_nodelist(nodelist)[0]


def placement(environ=os.environ) -> tuple[int, int, int, str]:
    """(rank, world size, local rank, source): from torchrun's variables, else SLURM's, else a single process."""
    if any(k in environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return (int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0)),
                "torchrun")
    if "SLURM_PROCID" in environ and ("SLURM_STEP_NUM_TASKS" in environ or "SLURM_NTASKS" in environ):
        tasks = environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS"))
        return int(environ["SLURM_PROCID"]), int(tasks), int(environ.get("SLURM_LOCALID", 0)), "slurm"
    return 0, 1, 0, "single"


def slurm_rendezvous(environ=os.environ) -> None:
    """MASTER_ADDR (the first host of the step's nodes) and MASTER_PORT (from the job id, so that two jobs on one
    node do not collide) for a job that srun started, unless they are set already."""
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or \
        environ.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in environ:
        if not nodelist:
            raise ValueError("SLURM_PROCID is set but no SLURM node list is: set MASTER_ADDR")
        environ["MASTER_ADDR"] = slurm_master_addr(nodelist)
    environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", 0)) % 20000))


def init(device: str = "auto", require_group: bool = False, timeout_minutes: float = 30.0) -> DistInfo:
    """Join the torchrun job if there is one; pick the device ('auto' = this rank's GPU if any, else CPU).
    `timeout_minutes` bounds how long a collective waits for a slow rank before the job aborts."""
    global _info
    rank, world_size, local_rank, source = placement(os.environ)
    if source == "slurm" and world_size > 1:
        slurm_rendezvous(os.environ)
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA GPU is visible")
    if use_cuda:
        if source == "slurm" and torch.cuda.device_count() == 1:  # srun --gpus-per-task=1: each task sees its own
            local_rank = 0
        if local_rank >= torch.cuda.device_count():  # NCCL cannot put two ranks of one job on one GPU
            raise ValueError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} visible GPU(s): "
                             f"start at most that many processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if (world_size > 1 or require_group) and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a plain single process that still needs a group (e.g. FSDP)
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                device_id=dev if use_cuda else None,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    _info = DistInfo(rank, world_size, local_rank, dev)
    return _info


def info() -> DistInfo:
    """What the last init() found (a single CPU process before any init)."""
    return _info


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if _info.rank == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy; the identity on one process)."""
    t = t.detach().clone()
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_gather_object(obj) -> list:
    """Every rank's obj, in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank src's obj, on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if init() joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
