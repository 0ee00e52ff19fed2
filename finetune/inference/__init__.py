"""Using a trained adapter: `load_for_inference`, `chat`, `merge_adapter` (load.py) and batched
generation for evaluation and `finetune generate` (generate.py)."""
