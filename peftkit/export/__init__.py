"""Merge and export: fold adapters into deployable weights, GGUF, adapter-only PEFT layout."""
