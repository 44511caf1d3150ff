"""FFN components (group `nanods.ffn`): dense.py and moe.py (with experts.py, its grouped kernel)."""
