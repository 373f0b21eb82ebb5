"""Pallas kernels (grouped matmul for expert dispatch, fused verification), each beside a jax.numpy reference.

Modules (each kernel has a TPU / Mosaic and a GPU / Triton variant, ``backend=``
"auto" | "tpu" | "gpu", and runs in the Pallas interpreter with ``interpret=True``):

  gmm                       grouped matmul ``gmm`` + transposed ``tgmm``, custom VJP, expert-parallel offset
  gmm_reference             its jax.numpy specification
  moe_backend               the ``pallas`` backend of jaxspec.models.moe_dispatch (registered on import)
  rejection_sampling        fused speculative-decoding verification (accept/reject + residual/bonus draw)
  rejection_sampling_reference   its jax.numpy specification (the engine's XLA path)
  verify_attention          T query tokens per slot against the slot's KV cache (cached_attention semantics)
  verify_attention_reference     its jax.numpy specification

See docs/kernels.md.
"""
