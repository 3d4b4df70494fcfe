"""fastcpu: compress a fine-tuned Transformer into fast CPU students and measure them deployed."""

__version__ = "0.1.0"
