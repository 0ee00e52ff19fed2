"""data_prep: scraped and annotated text -> clean, deduplicated, redacted, validated chat JSONL."""
