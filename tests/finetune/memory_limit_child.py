"""A training process under a real memory limit, for tests/finetune/test_plan_data.py:

    python tests/finetune/memory_limit_child.py CONFIG HEADROOM_FRACTION INFLATE [key=value ...]

The limit is this process's address space (RLIMIT_AS; any Linux, no privileges), set at the moment
the run asks how much memory it has (kitcore.runtime.host_memory_available: the auto budget is
decided then): what the process maps at that moment, the address space of the threads its steps
start, and HEADROOM_FRACTION of the plan of one micro-batch holding the whole optimizer step
(`training.tokens_per_step`, or the fixed `tokens_per_batch`). Setting it there, relative to the
process, keeps the test independent of how much address space the libraries map on a machine.
INFLATE > 1 makes the run believe it has that many times the memory it has (a plan that was too
optimistic), to drive the out-of-memory retry. Prints one JSON line: {"ok", "error", "limit"}.
"""

from __future__ import annotations

import json
import math
import resource
import sys


def main() -> int:
    config, headroom, inflate, *overrides = sys.argv[1:]
    import psutil

    import kitcore.runtime as runtime
    from finetune.config import ConfigError, load_config
    from finetune.plan.memory import ModelShape, make_plan, resolve_model_config, setup_from_config
    from finetune.training import recipe
    from kitcore.integrity import HASH_THREADS

    cfg = load_config(config, overrides)
    t = cfg.training
    step_tokens = t.tokens_per_step or t.tokens_per_batch
    raw, src = resolve_model_config(cfg.model)
    s = setup_from_config(cfg, device="cpu", device_memory=1 << 40)
    import dataclasses

    whole = make_plan(ModelShape.from_config(raw, src),
                      dataclasses.replace(s, micro_batch=math.ceil(step_tokens / cfg.max_length), seq_len=cfg.max_length),
                      alternatives=False).device_total
    real = runtime.host_memory_available
    limit = {}

    def limited(local_processes: int = 1):
        if not limit:
            vms = psutil.Process().memory_info().vms
            # the threads of the steps (not the checksum threads that hash the saved adapter afterwards:
            # the kit keeps room for those, and the test's limit must not give it to the steps)
            steps_threads = runtime.thread_address_space() - runtime.THREAD_ADDRESS_SPACE * HASH_THREADS
            limit["bytes"] = int(vms + steps_threads + float(headroom) * whole)
            resource.setrlimit(resource.RLIMIT_AS, (limit["bytes"], resource.RLIM_INFINITY))
        mem, what = real(local_processes)
        return int(mem * float(inflate)), what

    runtime.host_memory_available = limited
    try:
        recipe.train(cfg)
        out = {"ok": True, "error": None}
    except ConfigError as exc:
        out = {"ok": False, "error": str(exc)}
    out.update(limit=limit.get("bytes"), whole_step_plan=whole)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
