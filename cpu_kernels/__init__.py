"""CPU kernels: XLA FFI handlers in C++, built for the host on first use, each beside a jax.numpy reference.

Modules:

  native               compiles a kernel's source for this host (cached) and registers its handler
  moe_ffn              routed SwiGLU experts in one call (``moe_ffn.cc``): each chosen expert's rows
                       multiplied by its weights where they lie, over XLA's intra-op threads
  moe_ffn_reference    its jax.numpy specification
  dense_matmul         a few rows times a dense weight matrix (``dense_matmul.cc``): each weight
                       streamed once for all rows, column blocks over XLA's intra-op threads
  dense_matmul_reference  its jax.numpy specification
  slot_attention       attention of new tokens against their slot's cache, read in place
  slot_attention_reference  its jax.numpy specification

The products of both matmul kernels come from ``gemm.h``: each output element a sum over its
contraction index in ascending order, so a row's result does not depend on the other rows.

Where no C++ compiler is found, or the build fails, ``moe_ffn.available()`` says why and nothing
registers; callers keep to XLA. Like ``pallas_kernels``, nothing here imports ``jaxspec``.

See docs/kernels.md.
"""
