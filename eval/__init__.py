"""Evaluation: perplexity, recall suites (MQAR, passkey, JRT-style), the lm-eval adapter, step-wise generation."""
