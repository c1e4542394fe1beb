"""The model zoo: the papers' NeRF, graph, recommender and causal Transformer models with DFA
feedback points (``models/``), the offline datasets they train on (``data/``), one recipe per
family (``recipes/``: presets, tuned hyper-parameters, the paper's numbers), the task registry
(``tasks.py``) and the runner behind ``dfa-kernels train`` and ``compare`` (``training.py``).

The zoo uses the kernel core only through the public API (``dfa_kernels as dk``).
"""
