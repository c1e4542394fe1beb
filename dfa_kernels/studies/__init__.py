"""The papers' measurements: alignment, t-SNE, scaling laws (:mod:`.scaling`, fits in :mod:`.scaling_fit`).

They use the kernel core through ``import dfa_kernels as dk`` and the zoo's models and data.
"""
