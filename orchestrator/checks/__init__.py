"""Layer 1: what is known before work starts: every check that needs no Ray and no MLflow run
(`preflight`), and what each stage's output depends on (`stage_keys`)."""
