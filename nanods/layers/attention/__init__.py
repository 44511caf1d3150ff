"""Attention components (group `nanods.attention`): mha.py, mla.py; shared cache and SDPA helpers."""
