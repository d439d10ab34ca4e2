"""megafim: Megatron-style pretraining of GPT models that fill in the middle and predict several tokens."""

__version__ = "0.1.0"
