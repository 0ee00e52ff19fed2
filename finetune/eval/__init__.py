"""The evaluation stage: `finetune eval`.

    evaluation.py  intrinsic (NLL, perplexity, bits per byte) and extrinsic (generated answers)
    preference.py  preference data: reward accuracy and margins, base vs tuned
    metrics.py     the extrinsic metrics (exact match, F1, ROUGE-L, chrF, tool calls, your own)
    lm_eval.py     lm-evaluation-harness tasks on the tuned model
    report.py      base vs tuned report, tables and charts
"""
