"""Checkpoints: orbax model directories and Hugging Face import."""

from jaxspec.checkpoint.hf_config import SUPPORTED_ARCHITECTURES, hf_to_model_config, load_hf_config
from jaxspec.checkpoint.hf_loader import load_hf
from jaxspec.checkpoint.orbax_io import CheckpointError, is_model_dir, load_model, save_model

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CheckpointError",
    "hf_to_model_config",
    "is_model_dir",
    "load_hf",
    "load_hf_config",
    "load_model",
    "save_model",
]
