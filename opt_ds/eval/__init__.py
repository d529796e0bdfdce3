"""Evaluation of opt_ds models: lm-evaluation-harness tasks and perplexity on the pipeline engine
(`opt-ds eval`, and during training with `eval.tasks`); see docs/eval.md."""
