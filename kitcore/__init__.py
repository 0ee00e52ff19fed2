"""What `finetune` and `data_prep` share: one copy of each decision both packages depend on.

Light to import (no torch or transformers at import time): `runtime` (device and distributed
state), `io` (atomic writes), `schema` (the chat record), `overrides` (the `key=value` grammar).
"""
