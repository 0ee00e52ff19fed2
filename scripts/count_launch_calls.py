"""How often one `finetune train` enters the launch-settings module and the model-loading module from
outside them, and how often deciding the launch reads the DeepSpeed JSON: the figures of the
"configuration resolved once and passed down" change.

    python scripts/count_launch_calls.py                                    # this checkout
    PYTHONPATH=/path/to/older/checkout python scripts/count_launch_calls.py  # the flat layout
                                                                             # (run_setup.py, modeling.py)

One tiny LoRA run on CPU (a 2-layer model built here, 32 chats, 4 examples, 1 step), under
sys.setprofile. The DeepSpeed reads are counted while the launch is decided for the same config
with a ZeRO-2 JSON named in it (without launching DeepSpeed).
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import json
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parents[1]


def main() -> int:
    spec = importlib.util.spec_from_file_location("kit_conftest", HERE / "tests" / "conftest.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)

    import finetune
    from finetune.config import load_config
    from finetune.tiny import build_tiny_model
    from kitcore.runtime import current

    new = hasattr(importlib.import_module("finetune.training"), "__path__")
    launch_mod = "finetune.training.launch" if new else "finetune.run_setup"
    load_mod = "finetune.models.loading" if new else "finetune.modeling"
    d = pathlib.Path(tempfile.mkdtemp())
    data = conf.write_jsonl(d / "train.jsonl", conf.make_chat_examples(32, seed=0))
    model = build_tiny_model(d / "model", [data], vocab_size=320, hidden_size=64, layers=2, heads=4, kv_heads=2,
                             max_positions=512)
    ds = d / "zero2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": "auto",
                              "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))
    cfg = load_config(None, [f"model={model}", f"data.train={data}", f"output_dir={d / 'run'}",
                             "training.max_steps=1", "training.batch_size=4", "training.report_to=[none]",
                             "max_length=128"])

    reads = [0]
    real_read = pathlib.Path.read_text

    def read_text(self, *a, **k):
        if self.name == ds.name:
            reads[0] += 1
        return real_read(self, *a, **k)

    counts: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            mod = frame.f_globals.get("__name__", "")
            caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
            if mod in (launch_mod, load_mod) and caller != mod:  # entered from outside the module
                counts[(mod, frame.f_code.co_name)] += 1

    pathlib.Path.read_text = read_text
    launch = importlib.import_module(launch_mod)
    with_ds = cfg.model_copy(update={"deepspeed": str(ds)})
    rt = current()
    if new:
        launch.resolve_launch(with_ds, rt)
    else:  # what the flat layout's train() called, one by one
        launch.check_quantized_storage(with_ds, rt)
        launch.zero_stage(with_ds)
        launch.autocast_flags(with_ds, rt)
        launch.weights_dtype(with_ds, rt)
        launch.quantization_settings(with_ds)
    ds_reads = reads[0]
    sys.setprofile(profile)
    try:
        finetune.train(cfg)
    finally:
        sys.setprofile(None)
        pathlib.Path.read_text = real_read
    by_module: collections.Counter = collections.Counter()
    for (mod, _), n in counts.items():
        by_module[mod] += n
    print(json.dumps({
        "layout": "subpackages" if new else "flat",
        "entries_into_launch_settings_per_train": by_module[launch_mod],
        "entries_into_model_loading_per_train": by_module[load_mod],
        "functions_entered": sorted(f"{m.rsplit('.', 1)[1]}.{f}" for (m, f) in counts),
        "deepspeed_json_reads_deciding_the_launch": ds_reads,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
