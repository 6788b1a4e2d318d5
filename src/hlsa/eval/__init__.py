"""Evaluation: offline needle tests (`niah`), perplexity by position (`ppl`), LTE eviction pictures (`inspect`), and
the lm-evaluation-harness entry point (`python -m hlsa.eval.harness`). Submodules are imported on demand."""
