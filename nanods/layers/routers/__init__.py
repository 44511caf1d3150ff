"""Router components (group `nanods.router`): sigmoid.py (DeepSeek-V3's default), softmax.py; shared helpers."""
