"""The device and the distributed state: decided here, once, for every command.

Training, evaluation, inference, merge and the sweep all ask this module where to run and which
rank they are, instead of reading RANK/WORLD_SIZE or calling `torch.cuda.is_available()` each in
their own way. The process group itself is accelerate's `PartialState`; this module only chooses
how to create it (gloo when there is no GPU: accelerate picks no backend then, and every rank would
silently train alone) and reports what it became, as a small frozen `Runtime`.

Nothing here imports torch at module import time, so a bad config still fails in well under a
second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["Runtime", "launch_env", "decide_device", "start", "process_group", "current", "end", "inference_device_map",
           "release_accelerator_memory", "single_process_gpu", "worker_gpus", "host_memory_available",
           "thread_address_space"]


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: str  # "cuda:3", "cpu", "mps", ...
    backend: str | None  # "nccl", "gloo", ... or None when not distributed
    deepspeed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def on_accelerator(self) -> bool:
        return not self.device.startswith("cpu")


def launch_env(environ: dict[str, str] | None = None) -> tuple[int, int, int, int]:
    """(rank, local_rank, world_size, local_world_size) as a launcher (torchrun, accelerate launch,
    deepspeed, Slurm via accelerate) announces them, before any process group exists."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    return rank, local_rank, world, local_world


def decide_device(local_rank: int, *, cuda_devices: int, mps: bool = False) -> str:
    """The device this process computes on: its own GPU (`cuda:LOCAL_RANK`) when there are GPUs,
    else Apple's MPS, else the CPU. A local rank without a GPU of its own is a launch mistake (more
    processes than visible GPUs), said at once rather than two ranks sharing one card."""
    if cuda_devices > 0:
        if local_rank >= cuda_devices:
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: this process sees {cuda_devices} GPU(s) "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); launch at most "
                f"{cuda_devices} process(es) per node"
            )
        return f"cuda:{local_rank}"
    if mps:
        return "mps"
    return "cpu"


def _local_device(local_rank: int) -> str:
    import torch

    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return decide_device(local_rank, cuda_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                         mps=mps)


def _from_state(state, deepspeed: bool) -> Runtime:
    local_world = launch_env()[3]
    device = str(state.device)
    if device == "cuda":  # accelerate's single-process default: the current device
        import torch

        device = f"cuda:{torch.cuda.current_device()}"
    return Runtime(rank=state.process_index, local_rank=state.local_process_index,
                   world_size=state.num_processes, local_world_size=local_world if state.num_processes > 1 else 1,
                   device=device, backend=state.backend, deepspeed=deepspeed)


def start(*, deepspeed: bool = False, timeout_s: float | None = None) -> Runtime:
    """Join (or create) the process group of a launched job and return where this rank runs.

    GPUs: accelerate's defaults (NCCL, `cuda:LOCAL_RANK`). No GPU: gloo, with `cpu=True` for plain
    data parallel (accelerate then says MULTI_CPU and the Trainer wraps the model in DDP; without it
    the group exists but each rank trains its own copy) and DeepSpeed's own init for DeepSpeed.
    A world size that differs from what the launcher announced is an error: a rank that trains or
    scores alone looks like success.
    """
    import torch
    from accelerate import PartialState

    _, _, world, _ = launch_env()
    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    if world > 1 and not torch.cuda.is_available():
        kwargs["backend"] = "gloo"
        cpu = not deepspeed
    else:
        cpu = False
    # accelerate reads ACCELERATE_USE_DEEPSPEED to start the group through deepspeed.comm; it is
    # set only for this call and restored, so it does not outlive the run (a sweep's next trial).
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    if deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState(cpu=cpu, **kwargs)
    finally:
        if deepspeed:
            if previous is None:
                os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
            else:
                os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    if state.num_processes != world:
        raise RuntimeError(f"WORLD_SIZE={world} but the process group has {state.num_processes} process(es) "
                           f"({state.distributed_type}); refusing to run a rank alone")
    return _from_state(state, deepspeed)


def process_group():
    """`torch.distributed` when this process is in an initialized process group, else None: the one
    place that asks "is the group up?"."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def current() -> Runtime:
    """Where this process runs, without creating a process group: the existing accelerate state
    when there is one, else the launcher's environment and the local hardware."""
    rank, local_rank, world, local_world = launch_env()
    dist = process_group()
    if dist is not None:
        return Runtime(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(),
                       local_world_size=local_world, device=_local_device(local_rank),
                       backend=str(dist.get_backend()))
    return Runtime(rank=0, local_rank=0, world_size=1, local_world_size=1, device=_local_device(0),
                   backend=None)


def end() -> None:
    """Tear the process group down (every rank past its last collective). Left to interpreter
    exit, gloo ranks have aborted ("terminate called without an active exception")."""
    dist = process_group()
    if dist is not None:
        dist.destroy_process_group()


def inference_device_map(runtime: Runtime):
    """`device_map` for loading a model to run (not train): the whole model on this rank's GPU in a
    distributed job (each rank scores its own shard); in a single process on GPUs, accelerate's
    "auto" (one GPU when the model fits, spread over the visible GPUs when it does not); None on
    CPU (weights stay where they are loaded)."""
    if runtime.device.startswith("cuda"):
        if runtime.distributed:
            return {"": int(runtime.device.split(":")[1])}
        return "auto"
    if runtime.device == "mps":
        return {"": "mps"}
    return None


def release_accelerator_memory() -> None:
    """Give device memory back once a model is gone (before the post-train eval or the next sweep
    trial loads another model in this process), and drop transformers' global reference to a
    finished run's DeepSpeed config: while it is set, every later `from_pretrained` enters ZeRO-3's
    `zero.Init` with that run's batch sizes and a process group that no longer exists."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _trim_host_heap()
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _trim_host_heap() -> None:
    """Hand the free pages of glibc's malloc heaps back to the system (malloc_trim): freed tensors of
    a finished model otherwise stay in this process's resident memory, counted against a cgroup
    limit. Address space inside a heap stays mapped (an RLIMIT_AS still counts it). A no-op on
    other C libraries."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def single_process_gpu(environ: dict[str, str] | None = None) -> str | None:
    """Pin a training process started without a launcher to one GPU; returns what it set.

    transformers' Trainer, alone on a node with 8 visible GPUs, multiplies the batch by 8 and wraps
    the model in `nn.DataParallel` (and puts a 4-bit model's whole batch on GPU 0). Data parallel
    is `accelerate launch`'s job, so a plain `finetune train` sees GPU 0 only. Must run before CUDA
    is initialised (the CLI calls it before importing torch); an explicit CUDA_VISIBLE_DEVICES or
    a launcher (LOCAL_RANK set) is left alone."""
    env = os.environ if environ is None else environ
    if "LOCAL_RANK" in env or "CUDA_VISIBLE_DEVICES" in env:
        return None
    env["CUDA_VISIBLE_DEVICES"] = "0"
    return "0"


def worker_gpus(workers: int, visible: list[str]) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each of `workers` local processes sharing a node's GPUs
    (`visible`: the ids this process may use): round-robin, one GPU each, so that N sweep workers
    do not all train on cuda:0. None for every worker when there is no GPU."""
    if not visible:
        return [None] * workers
    return [visible[i % len(visible)] for i in range(workers)]


def _read_int(path: str) -> int | None:
    try:
        text = open(path).read().strip()
    except OSError:
        return None
    return None if text == "max" else int(text) if text.isdigit() else None


def _cgroup_stat(path: str, key: str) -> int:
    try:
        for line in open(path):
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_available(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> tuple[int, str] | None:
    """What this process's memory cgroup (and each ancestor with a limit) still allows: limit minus
    usage, the reclaimable inactive page cache counted as free (as `docker stats` does). cgroup v2
    (memory.max / memory.current) and v1 (memory.limit_in_bytes / memory.usage_in_bytes); the cgroup
    is looked up under its path and, inside a container whose cgroup namespace hides the path, at
    the mount's root. None when no limit applies."""
    try:
        entries = [line.rstrip("\n").split(":", 2) for line in open(proc_cgroup)]
    except OSError:
        return None
    tried = []
    for _, controllers, path in entries:
        if controllers == "":  # v2
            base, files = root, ("memory.max", "memory.current", "memory.stat", "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            base, files = os.path.join(root, "memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                        "memory.stat", "total_inactive_file")
        else:
            continue
        rel = path.strip("/")
        parts = rel.split("/") if rel else []
        dirs = [os.path.join(base, *parts[:i]) for i in range(len(parts), -1, -1)]
        for d in dirs:
            if d in tried or not os.path.isfile(os.path.join(d, files[1])):
                continue
            tried.append(d)
            limit, used = _read_int(os.path.join(d, files[0])), _read_int(os.path.join(d, files[1]))
            if limit is None or used is None or limit >= 1 << 60:  # v1 writes "no limit" as ~2^63
                continue
            free = limit - max(0, used - _cgroup_stat(os.path.join(d, files[2]), files[3]))
            return max(0, free), f"the memory cgroup {d} ({limit / 2**30:.2f} GiB limit)"
    return None


# Address space a thread maps without touching it: glibc's malloc arena for it (64 MiB reserved on
# 64-bit Linux) and its stack (8 MiB by default). RLIMIT_AS counts them; RSS does not.
THREAD_ADDRESS_SPACE = 72 << 20


def thread_address_space() -> int:
    """The address space the threads a training run starts will reserve: torch's intra-op pool, four
    more during the steps (autograd, the data loader's, the tokenizer's, the logger's) and the
    checksum threads that hash what it saves (kitcore.integrity). Measured on 2 cores: the address
    space grew 0.28-0.41 GiB more than the resident memory between the plan and the peak; without the
    checksum threads counted, a run that trained within an address-space limit could fail hashing
    its adapter."""
    from kitcore.integrity import HASH_THREADS

    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = os.cpu_count() or 1
    return THREAD_ADDRESS_SPACE * (threads + 4 + HASH_THREADS)


def host_memory_available(local_processes: int = 1) -> tuple[int, str]:
    """(bytes this process may still allocate on the host, what sets it): the least of the system's
    available memory and its memory cgroup's headroom (a container's or a Slurm job's limit), both
    shared by this node's `local_processes`, and of this process's own address-space limit
    (RLIMIT_AS, e.g. `ulimit -v`) minus the address space it already maps. A plan for a CPU run is
    made against this, not against the machine's total."""
    import resource

    import psutil

    n = max(1, local_processes)
    found = [(int(psutil.virtual_memory().available / n), "the system's available memory")]
    cg = _cgroup_available()
    if cg is not None:
        found.append((int(cg[0] / n), cg[1]))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found.append((max(0, soft - psutil.Process().memory_info().vms - thread_address_space()),
                      f"this process's address-space limit (RLIMIT_AS {soft / 2**30:.2f} GiB, less "
                      f"{thread_address_space() / 2**20:.0f} MiB for the threads training starts)"))
    mem, what = min(found)
    return mem, what + (f", shared by {n} processes" if n > 1 and "RLIMIT" not in what else "")
