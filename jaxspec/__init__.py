"""jaxspec: JAX-native serving of Mixture-of-Experts language models with speculative decoding."""

__version__ = "0.1.0"
