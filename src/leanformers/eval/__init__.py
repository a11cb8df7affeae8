"""Evaluation: perplexity (eval/perplexity.py)."""
