"""Text and image encoders (sentence-transformers, EfficientNet-Lite0, CLIP-style models)."""
