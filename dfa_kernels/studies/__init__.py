"""The papers' measurements, on the zoo's tasks: DFA's alignment with backprop (``alignment``),
t-SNE maps of learned representations (``tsne``) and the scaling-law harness (``scaling``).

The studies use the kernel core only through the public API (``dfa_kernels as dk``).
"""
