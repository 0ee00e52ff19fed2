"""Steps over records: clean (Unicode/whitespace), redact (PII), filter (quality), dedup (exact + near)."""
