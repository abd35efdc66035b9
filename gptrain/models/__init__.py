"""GPT-2 and Llama model families: configs, the transformer, weights and generation."""

from gptrain.models.config import MODEL_CONFIGS, ModelConfig, RopeScaling, get_model_config
from gptrain.models.transformer import Transformer, count_parameters

__all__ = ["MODEL_CONFIGS", "ModelConfig", "RopeScaling", "Transformer", "count_parameters", "get_model_config"]
