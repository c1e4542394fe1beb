"""The model zoo: NeRF, graph, recommender and causal Transformer models with DFA feedback points."""
