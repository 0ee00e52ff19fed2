"""The models a run loads: tokenizer and base model (loading.py), the chunked losses (losses.py) and
a distillation teacher (teacher.py)."""
