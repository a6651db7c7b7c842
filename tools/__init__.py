"""Programs around a run: the papers' protocols and their tables (python -m tools.protocols)."""
