"""Quantization backends for the base model."""
