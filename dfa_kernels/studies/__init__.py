"""The papers' measurements, on the zoo's tasks: DFA's alignment with backprop (``alignment``),
t-SNE maps of learned representations (``tsne``) and the scaling-law harness (``scaling``, its
fits in ``scaling_fit``).

They use the kernel core only through the public API (``dfa_kernels as dk``), and the zoo's models
and data.
"""
