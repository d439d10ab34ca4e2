"""Conversion between megafim checkpoints and Hugging Face Llama directories."""
