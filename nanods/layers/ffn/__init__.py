"""FFN components (group `nanods.ffn`): dense.py and moe.py (its routed experts: experts.py, kernels: dispatch.py)."""
