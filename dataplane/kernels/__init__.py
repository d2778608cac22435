"""Triton kernels of the CUDA fast path: one kernel where torch would launch several small ones.

Each module here holds one fused kernel and its launcher; `dense` stays the reference they are
tested against. Triton is imported lazily (GPU machines, or its CPU interpreter in tests); this
package must not be imported by anything the CPU serving path needs.
"""
