"""Plumbing every room uses and that imports no other room: typed configs and their errors (config), writes that
fail in one line (writing), weights-only unpickling (safe_load), one run per directory (run_lock, hydra_callbacks),
the machine's facts (hardware) and peak memory (memory)."""
