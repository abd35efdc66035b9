"""`train.bf16_mode=bf16_copy`: forward and backward run on a bf16 copy of the model, while the
fp32 model keeps the master weights that the optimizer updates, checkpoints save and
evaluation reads.

Autocast instead recasts every weight to bf16 in each micro-batch's forward and its gradient
back to fp32 in the backward, and runs norms, activations and the residual stream in fp32: on
a CPU that traffic costs more than the bf16 matmuls save. Here the weights are cast once per
optimizer step (`refresh`), and each micro-batch's bf16 gradients are added to fp32 ones
(`accumulate_gradients`), so accumulation and the optimizer stay fp32 as under autocast (a
matmul weight's gradient is even the same: autocast's is also bf16 cast up).

On a CPU the copy also leaves out full-vocabulary passes of the backward: for GPT-2 124M at
context 256, batch 2 on 2 cores, the step's minimum went from 0.84-0.85 s to 0.72-0.78 s
(alternating runs of separate processes):

- The token embedding's gradient is a few rows (one per token of the batch), but autograd
  makes it a dense vocabulary x d_model tensor: zero-filled in fp32, scattered into, and added
  to the tied output head's gradient. The copy looks the rows up outside autograd's graph of
  the weight (`TokenRows`), keeps their gradients, and adds them into the fp32 master gradient
  with `index_add_` (in fp32, where autograd rounded the sum to bf16).
- The padding rows of the vocabulary (`model.vocab_pad_multiple`): on a CPU the head computes
  only the real rows (see Transformer.forward), so autograd padded the head's gradient with a
  copy. The copy holds the real rows only; the masters' padding rows get no gradient, as before.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from gptrain.models.transformer import Transformer


class TokenRows(nn.Module):
    """The copy's token embedding on a CPU: the rows it looks up are leaves of autograd's graph,
    so a backward gives their gradients (batch x seq x d_model) and no gradient for the weight;
    `Bf16Copy.accumulate_gradients` adds them into the master's rows."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight  # tied: the output head's weight, whose gradient autograd computes
        self.lookups: list[tuple[torch.Tensor, torch.Tensor]] = []  # (token ids, rows) since the last accumulate

    # Eager, before the compiled rest of the model (a graph break): the rows must be a real
    # leaf tensor, whose `.grad` the backward fills, and a traced graph makes none.
    @torch.compiler.disable
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx, self.weight.detach())
        if torch.is_grad_enabled():
            rows.requires_grad_()
            self.lookups.append((idx, rows))
        return rows


class Bf16Copy:
    """The bf16 copy of `model` that `parallelize` hands the training step (single process)."""

    def __init__(self, model: Transformer):
        self.module = copy.deepcopy(model).to(torch.bfloat16)
        self.token_rows: TokenRows | None = None
        if model.tok_emb.weight.device.type == "cpu":
            self._real_vocabulary_rows_only()
            self.token_rows = self.module.tok_emb = TokenRows(self.module.tok_emb.weight)
        # deepcopy keeps the parameter order and the tied weights, and a module or parameter
        # replaced above keeps its place: the two lists pair up.
        self.pairs = list(zip(model.parameters(), self.module.parameters()))
        # The master of the token embedding and its place in `pairs`: its row gradients go there.
        self.token_master = model.tok_emb.weight
        self.token_index = next(i for i, (master, _) in enumerate(self.pairs) if master is self.token_master)
        # The fp32 gradients live in buffers allocated once, and the bf16 ones are widened
        # through one scratch buffer: on a CPU, a fresh 0.6 GB tensor per step (GPT-2 124M)
        # costs its page faults, 0.15-0.25 s against 0.02 s for the copy into a reused buffer,
        # and adding bf16 to fp32 in place is 5x slower than a widening copy plus an fp32 add.
        self.gradients: list[torch.Tensor] | None = None
        self.scratch: torch.Tensor | None = None

    def _real_vocabulary_rows_only(self) -> None:
        module, vocab = self.module, self.module.config.vocab_size
        if module.tok_emb.num_embeddings == vocab:
            return
        tied = module.lm_head.weight is module.tok_emb.weight
        module.tok_emb.weight = nn.Parameter(module.tok_emb.weight[:vocab].clone())
        module.tok_emb.num_embeddings = vocab
        module.lm_head.weight = module.tok_emb.weight if tied else nn.Parameter(module.lm_head.weight[:vocab].clone())
        module.lm_head.out_features = vocab

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the fp32 weights into the bf16 ones (after each optimizer step and any load)."""
        for master, compute in self.pairs:
            compute.copy_(master[: len(compute)])

    @torch.no_grad()
    def accumulate_gradients(self) -> None:
        """Add the bf16 gradients of the last backward to the fp32 weights' gradients."""
        if self.gradients is None:
            # zeros: a master's padding rows, which the copy does not hold, keep a zero gradient.
            self.gradients = [torch.zeros_like(master) for master, _ in self.pairs]
            largest = max(master.numel() for master, _ in self.pairs)
            self.scratch = torch.empty(largest, dtype=torch.float32, device=self.pairs[0][0].device)
        for (master, compute), gradient in zip(self.pairs, self.gradients):
            if compute.grad is None:
                continue
            if master.grad is None:  # the step's first micro-batch (zero_grad set it to None)
                gradient[: len(compute)].copy_(compute.grad)
                master.grad = gradient
            else:
                widened = self.scratch[: compute.numel()].view_as(compute).copy_(compute.grad)
                master.grad[: len(compute)].add_(widened)
            compute.grad = None
        if self.token_rows is not None:
            self._add_token_row_gradients()

    def _add_token_row_gradients(self) -> None:
        master = self.token_master
        for idx, rows in self.token_rows.lookups:
            if rows.grad is None:
                continue
            if master.grad is None:  # an untied embedding, whose only gradient these rows are
                master.grad = self.gradients[self.token_index].zero_()
            master.grad.index_add_(0, idx.flatten(), rows.grad.flatten(0, 1).float())
        self.token_rows.lookups.clear()
