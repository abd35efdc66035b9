"""The optimizer: AdamW (or GaLore's AdamW) with weight decay only on the matmul weights.

Norm gains, biases and embeddings are left undecayed: shrinking a norm's gain or a bias
towards zero only fights the model, and an embedding row is decayed only on the steps its
token happens to appear, which biases rare tokens (the GPT-3/nanoGPT recipe). A tied output
head is the token embedding, so it is not decayed either.

GaLore (Zhao et al. 2024) keeps Adam's moments for the transformer blocks' 2-D weights (the
attention and MLP projections) in a low-rank subspace of their gradients, recomputed every
`update_proj_gap` steps; every other parameter is updated by the same optimizer as plain AdamW.
"""

from __future__ import annotations

import torch
from torch import nn

from gptrain.config import OptimConfig
from gptrain.errors import GptrainError


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(block matmul weights, other decayed weights, undecayed parameters), each parameter once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    block_matmuls = {
        id(module.weight)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("blocks.")
    }
    blocks, other_decay, no_decay = [], [], []
    for param in model.parameters():  # a tied weight is yielded once
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embeddings:
            no_decay.append(param)
        elif id(param) in block_matmuls:
            blocks.append(param)
        else:
            other_decay.append(param)
    return blocks, other_decay, no_decay


def build_optimizer(model: nn.Module, config: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW over `model`'s parameters; the learning rate is set each step by the schedule."""
    blocks, other_decay, no_decay = split_parameters(model)
    betas = (config.beta1, config.beta2)
    if config.galore.enabled:
        return _galore_adamw(blocks, other_decay, no_decay, config)
    groups = [
        {"params": blocks + other_decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel updates each parameter in one pass; the default per-tensor loop makes
    # ~10 passes and allocates temporaries as large as the embedding: for GPT-2 124M on two
    # CPU cores, 0.05 s a step instead of 0.6 s.
    fused = device_type in ("cuda", "cpu") if config.fused == "auto" else config.fused
    return torch.optim.AdamW(groups, lr=config.lr, betas=betas, eps=config.eps, fused=fused)


def _galore_adamw(blocks, other_decay, no_decay, config: OptimConfig) -> torch.optim.Optimizer:
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as err:
        raise GptrainError(
            "optim.galore.enabled=true needs the galore-torch package: pip install 'gptrain[galore]'"
        ) from err
    galore = config.galore
    groups = [
        {
            "params": blocks,
            "weight_decay": config.weight_decay,
            "rank": galore.rank,
            "update_proj_gap": galore.update_proj_gap,
            "scale": galore.scale,
            "proj_type": galore.proj_type,
        },
        {"params": other_decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    return GaLoreAdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, no_deprecation_warning=True
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
