"""Quantised weights and activations (FP8 E4M3): the formats, made once at load, and their PyTorch references."""
