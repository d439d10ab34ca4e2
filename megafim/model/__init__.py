"""Model: the Llama-style GPT trunk and its n future-token heads (plain PyTorch, no process groups)."""

from megafim.model.config import ModelConfig, ModelConfigError
from megafim.model.gpt import GPT, Block, GPTOutput
from megafim.model.registry import MODEL_SIZES, model_config

__all__ = ["GPT", "Block", "GPTOutput", "ModelConfig", "ModelConfigError", "MODEL_SIZES", "model_config"]
