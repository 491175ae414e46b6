"""Adapters that let other evaluation harnesses run vlweave checkpoints (each imports its harness lazily)."""
