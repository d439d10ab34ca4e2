"""Data: tokenizer, Megatron-compatible indexed datasets, sample index, and the FIM transform."""
