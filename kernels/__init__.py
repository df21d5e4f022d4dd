"""Triton kernels of v2l_fast, importable as `v2l_fast.kernels`; one module per kernel family.

Each module holds its ``@triton.jit`` kernels, the launch wrapper and the autograd Function,
and is held to its twin in `v2l_fast.reference` by the tests. Import a family's module only
when it is used: importing triton is not free, and `v2l_fast.ops` loads them lazily.
"""
