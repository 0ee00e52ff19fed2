"""`finetune plan`: will a run fit, per device, before anything loads (memory.py)."""
