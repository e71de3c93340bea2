"""Benchmarks that measure refrag against the full-context decoder side by side, in one process."""
