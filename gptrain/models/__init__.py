"""GPT-2 and Llama model families: configs, the transformer, weights and generation.

Names are imported on first use so that `import gptrain.models.cli` (for `gptrain --help`)
does not pay for importing torch.
"""

import importlib

_EXPORTS = {
    "MODEL_CONFIGS": "gptrain.models.config",
    "ModelConfig": "gptrain.models.config",
    "RopeScaling": "gptrain.models.config",
    "get_model_config": "gptrain.models.config",
    "Transformer": "gptrain.models.transformer",
    "count_parameters": "gptrain.models.transformer",
    "load_pretrained": "gptrain.models.weights",
    "save_hf_pretrained": "gptrain.models.weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptrain.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
