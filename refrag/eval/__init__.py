"""Evaluation: the paper's perplexity protocol, RAG QA metrics and modes, and the combined report."""
