"""Pallas kernels (grouped matmul for expert dispatch, fused verification), each beside a jax.numpy reference.

Modules (each kernel has a TPU / Mosaic and a GPU / Triton variant, ``backend=``
"auto" | "tpu" | "gpu", and runs in the Pallas interpreter with ``interpret=True``):

  gmm                       grouped matmul ``gmm`` + transposed ``tgmm``, custom VJP, expert-parallel offset
  gmm_reference             its jax.numpy specification
  rejection_sampling        fused speculative-decoding verification (accept/reject + residual/bonus draw)
  rejection_sampling_reference   its jax.numpy specification (the engine's XLA path)
  verify_attention          T query tokens per slot against the slot's KV cache (cached_attention semantics)
  verify_attention_reference     its jax.numpy specification

The kernels know nothing of the model package: nothing here imports ``jaxspec``
(tests/test_imports.py checks it). The model side adapts them, e.g. the ``pallas``
MoE backend is ``jaxspec.models.moe_pallas`` over ``gmm``.

See docs/kernels.md.
"""
