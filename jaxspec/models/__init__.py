"""Model family: one decoder definition covering dense and MoE Llama/Mistral/Qwen/Mixtral shapes."""

from jaxspec.models.kv_cache import KVCache
from jaxspec.models.transformer import ForwardOutput, Transformer, abstract_model, create_model

__all__ = ["ForwardOutput", "KVCache", "Transformer", "abstract_model", "create_model"]
