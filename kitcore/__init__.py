"""What `finetune` and `data_prep` share: one copy of each decision both packages depend on.

Light to import (no torch at import time): `runtime` (device and distributed state).
"""
