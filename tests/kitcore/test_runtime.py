"""The device decision (kitcore.runtime): one function, used by every command.

These run on CPU; tests/gpu/ checks the same functions on a CUDA machine."""

from __future__ import annotations

import pytest

from kitcore import runtime


def test_a_gpu_rank_computes_on_its_own_gpu():
    assert runtime.decide_device(0, cuda_devices=8) == "cuda:0"
    assert runtime.decide_device(5, cuda_devices=8) == "cuda:5"


def test_without_gpus_a_rank_stays_on_the_cpu_or_mps():
    assert runtime.decide_device(0, cuda_devices=0) == "cpu"
    assert runtime.decide_device(3, cuda_devices=0) == "cpu"
    assert runtime.decide_device(0, cuda_devices=0, mps=True) == "mps"


def test_more_ranks_than_gpus_is_a_launch_error():
    with pytest.raises(RuntimeError, match="local rank 2 has no GPU: this process sees 2 GPU"):
        runtime.decide_device(2, cuda_devices=2)


def test_launch_env_reads_what_torchrun_sets():
    env = {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    assert runtime.launch_env(env) == (9, 1, 16, 8)
    assert runtime.launch_env({}) == (0, 0, 1, 1)


def test_current_on_this_machine_is_a_single_cpu_process(monkeypatch):
    import torch

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    rt = runtime.current()
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert (rt.rank, rt.world_size, rt.device, rt.distributed) == (0, 1, expected, False)
    assert rt.is_main and rt.is_local_main


def test_inference_placement():
    cpu = runtime.Runtime(0, 0, 1, 1, "cpu", None)
    one_gpu_process = runtime.Runtime(0, 0, 1, 1, "cuda:0", None)
    rank3 = runtime.Runtime(3, 3, 8, 8, "cuda:3", "nccl")
    assert runtime.inference_device_map(cpu) is None
    assert runtime.inference_device_map(one_gpu_process) == "auto"  # spread only when it does not fit
    assert runtime.inference_device_map(rank3) == {"": 3}  # each rank scores its shard on its GPU


def test_a_training_process_without_a_launcher_sees_one_gpu():
    env: dict[str, str] = {}
    assert runtime.single_process_gpu(env) == "0" and env["CUDA_VISIBLE_DEVICES"] == "0"
    launched = {"LOCAL_RANK": "2"}
    assert runtime.single_process_gpu(launched) is None and "CUDA_VISIBLE_DEVICES" not in launched
    chosen = {"CUDA_VISIBLE_DEVICES": "3,4"}
    assert runtime.single_process_gpu(chosen) is None and chosen["CUDA_VISIBLE_DEVICES"] == "3,4"


def test_sweep_workers_get_one_gpu_each():
    assert runtime.worker_gpus(3, []) == [None, None, None]
    assert runtime.worker_gpus(4, ["0", "1"]) == ["0", "1", "0", "1"]
    assert runtime.worker_gpus(2, ["4", "6", "7"]) == ["4", "6"]


def test_release_drops_a_finished_runs_deepspeed_config():
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    cfg = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 8})  # registers itself
    assert is_deepspeed_zero3_enabled()
    runtime.release_accelerator_memory()
    assert not is_deepspeed_zero3_enabled()
    del cfg


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_host_memory_reads_the_memory_cgroup_v2_and_v1_and_their_ancestors(tmp_path):
    """A container's or a Slurm job's memory limit is what a CPU run plans for: limit minus usage, the
    inactive page cache counted as free; the cgroup found under its path, or at the mount's root when
    a cgroup namespace hides the path; an unlimited cgroup ("max", or v1's ~2^63) sets nothing."""
    GiB = 1 << 30
    v2 = tmp_path / "v2"
    _write(v2 / "proc", "0::/job/step\n")
    _write(v2 / "job/step/memory.max", "max\n")
    _write(v2 / "job/step/memory.current", f"{GiB}\n")
    _write(v2 / "job/memory.max", f"{4 * GiB}\n")  # the limit is set on the parent (a Slurm job, its step inside)
    _write(v2 / "job/memory.current", f"{3 * GiB}\n")
    _write(v2 / "job/memory.stat", f"anon 1\ninactive_file {GiB // 2}\n")
    free, what = runtime._cgroup_available(str(v2), str(v2 / "proc"))
    assert free == GiB + GiB // 2 and str(v2 / "job") in what and "4.00 GiB" in what
    v1 = tmp_path / "v1"
    _write(v1 / "proc", "12:pids:/x\n4:memory:/docker/abc\n")
    _write(v1 / "memory/memory.limit_in_bytes", f"{2 * GiB}\n")  # namespaced: the container's cgroup is the root
    _write(v1 / "memory/memory.usage_in_bytes", f"{GiB}\n")
    _write(v1 / "memory/memory.stat", f"cache 5\ntotal_inactive_file {GiB // 4}\n")
    assert runtime._cgroup_available(str(v1), str(v1 / "proc"))[0] == GiB + GiB // 4
    _write(v1 / "memory/memory.limit_in_bytes", "9223372036854771712\n")
    assert runtime._cgroup_available(str(v1), str(v1 / "proc")) is None
    assert runtime._cgroup_available(str(tmp_path / "none"), str(tmp_path / "no_proc")) is None


def test_host_memory_available_is_the_least_of_the_system_the_cgroup_and_the_address_space_limit(monkeypatch):
    import resource

    import psutil

    GiB = 1 << 30
    monkeypatch.setattr(runtime, "_cgroup_available", lambda: (6 * GiB, "the memory cgroup /sys/fs/cgroup/job"))
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=16 * GiB))
    assert runtime.host_memory_available(2) == (3 * GiB, "the memory cgroup /sys/fs/cgroup/job, shared by 2 processes")
    vms = psutil.Process().memory_info().vms
    monkeypatch.setattr(resource, "getrlimit", lambda what: (vms + 2 * GiB, resource.RLIM_INFINITY)
                        if what == resource.RLIMIT_AS else (resource.RLIM_INFINITY,) * 2)
    mem, what = runtime.host_memory_available(1)
    assert what.startswith("this process's address-space limit (RLIMIT_AS")
    assert 0 <= 2 * GiB - runtime.thread_address_space() - mem < 64 << 20  # less what the process mapped since
