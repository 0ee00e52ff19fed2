"""The training stage: `finetune train` from a config to a run directory.

    recipe.py     train(): launch -> data -> model -> trainer -> train -> export -> eval, top to bottom
    launch.py     what the config and the launch decide together (DeepSpeed, ZeRO stage, dtypes,
                  4-bit settings, kernels), resolved once into a frozen object
    arguments.py  the TrainingArguments (or a method's TRL config) of a run
    run_dir.py    the run directory: overwrite/resume rules, run.json, the exported adapter
    callbacks.py  metrics log, pre-emption, checksummed COMPLETE checkpoints
"""
