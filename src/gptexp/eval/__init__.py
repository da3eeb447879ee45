"""Scoring a model: perplexity by sliding windows and multiple-choice log-likelihoods (scoring), and any source as
an lm-evaluation-harness model (lm_eval_adapter)."""
