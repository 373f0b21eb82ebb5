"""Checkpoints: orbax model directories (and, later, Hugging Face import)."""

from jaxspec.checkpoint.orbax_io import CheckpointError, is_model_dir, load_model, save_model

__all__ = ["CheckpointError", "is_model_dir", "load_model", "save_model"]
