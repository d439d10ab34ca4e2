"""Named model sizes. ``model_config("1.3B", n_future=4)`` gives a validated ModelConfig."""

from __future__ import annotations

from megafim.model.config import ModelConfig, ModelConfigError

# Llama-style shapes; vocab 32000 is Llama-2's (the trainer replaces it with its tokenizer's size).
MODEL_SIZES: dict[str, ModelConfig] = {
    # For tests: a few hundred thousand parameters; 8 query / 4 kv heads and FFN 176 divide by tp = 1, 2, 4.
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, n_layers=4, n_heads=8, n_kv_heads=4,
                        ffn_hidden_size=176, max_seq_len=256),
    "125M": ModelConfig(vocab_size=32000, hidden_size=768, n_layers=12, n_heads=12, n_kv_heads=12,
                        ffn_hidden_size=2048, max_seq_len=2048),
    "350M": ModelConfig(vocab_size=32000, hidden_size=1024, n_layers=24, n_heads=16, n_kv_heads=16,
                        ffn_hidden_size=2816, max_seq_len=2048),
    # The benchmark shape.
    "1.3B": ModelConfig(vocab_size=32000, hidden_size=2048, n_layers=24, n_heads=16, n_kv_heads=16,
                        ffn_hidden_size=5632, max_seq_len=2048),
    # Llama-2-7B.
    "7B": ModelConfig(vocab_size=32000, hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      ffn_hidden_size=11008, max_seq_len=4096),
}


def model_config(size: str, **overrides) -> ModelConfig:
    """The named size with ``overrides`` applied (any ModelConfig field), validated."""
    if size not in MODEL_SIZES:
        raise ModelConfigError(f"unknown model size {size!r}; known sizes: {', '.join(MODEL_SIZES)}")
    return MODEL_SIZES[size].replace(**overrides)
