"""`python -m finetune.sweep`: what `finetune sweep --workers N` spawns, one process per worker."""

from finetune.sweep.cli import main

raise SystemExit(main())
