"""Train with gptrain's Trainer (one rank of a torchrun job, or alone), then save the final
parameters from rank 0 so a test can compare runs (checkpointing is not part of the trainer yet).

    torchrun --nproc-per-node=2 tests/ddp_train_worker.py OUT.pt CONFIG [KEY=VALUE ...]
"""

from __future__ import annotations

import sys

import torch

from gptrain.config import load_config
from gptrain.distributed import destroy_distributed, init_distributed
from gptrain.train.trainer import Trainer


def main(out: str, config_name: str, *overrides: str) -> None:
    config = load_config(config_name, overrides)
    env = init_distributed(config.train.resolved_device())
    try:
        trainer = Trainer(config, env)
        trainer.fit()
        if env.is_main:
            torch.save({name: p.detach().clone() for name, p in trainer.state.model.state_dict().items()}, out)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
