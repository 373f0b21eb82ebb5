"""Pallas kernels (grouped matmul for expert dispatch, fused verification), each beside a jax.numpy reference."""
