"""Model: the Llama-style GPT trunk and its n future-token heads (plain PyTorch, no process groups)."""
