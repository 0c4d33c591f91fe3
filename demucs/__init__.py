"""Hybrid Demucs (v3): music source separation models, training and tools."""

__version__ = "3.0.1"
