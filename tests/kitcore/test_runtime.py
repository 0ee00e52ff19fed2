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
