"""Inference: KV-cache generation, FIM infilling, and self-speculative decoding with the extra heads."""
