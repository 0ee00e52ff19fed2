"""`python -m finetune.plan CONFIG.yaml ...`: the same as `finetune plan`."""

from finetune.plan.command import main

raise SystemExit(main())
