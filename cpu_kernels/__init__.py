"""CPU kernels: XLA FFI handlers in C++, built for the host on first use, each beside a jax.numpy reference.

Modules:

  native               compiles a kernel's source for this host (cached) and registers its handler
  moe_ffn              routed SwiGLU experts in one call (``moe_ffn.cc``): each chosen expert's rows
                       multiplied by its weights where they lie, over XLA's intra-op threads
  moe_ffn_reference    its jax.numpy specification

Where no C++ compiler is found, or the build fails, ``moe_ffn.available()`` says why and nothing
registers; callers keep to XLA. Like ``pallas_kernels``, nothing here imports ``jaxspec``.

See docs/kernels.md.
"""
