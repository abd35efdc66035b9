"""`gptrain plan`: the memory one rank needs to train a config, for ddp and fsdp, with and
without activation checkpointing, and whether that fits a stated device memory.

    gptrain plan --config llama-1b-gutenberg --world-size 8 --device-memory 80
    gptrain plan --config gpt2-124m-gutenberg --world-size 8 --device-memory 80 model.name=llama3-8b \\
        model.vocab_size=128256 model.context_length=8192 train.micro_batch_size=1 train.grad_accum_steps=1

Per rank, in bytes (P parameters, of which P_root outside the blocks and P_block in each of
the L blocks; N ranks, S of them sharing one copy under fsdp; shards are 1/S of dimension 0,
rounded up):

  parameters     fp32 master weights: 4P (ddp), 4P/S (fsdp)
  gradients      fp32: 4P (ddp), 4P/S (fsdp)
  optimizer      AdamW's two fp32 moments: 8P (ddp), 8P/S (fsdp) (an upper bound for GaLore)
  communication  ddp on several ranks: its all-reduce buckets, a second copy of the gradients
                 (4P). fsdp: gathered parameters in the compute dtype (the root's from the
                 forward to the end of the backward; one block and the prefetched next, or
                 with train.fsdp_reshard_after_forward=false every block, from forward to
                 backward), in the backward the root's unsharded gradients and one block's in
                 compute and reduce (fp32) dtype; with grad_accum_steps > 1 the unsharded fp32
                 gradients of every parameter, accumulated without a reduce-scatter until the
                 last micro-batch (4P).
  activations    per micro-batch of T = micro_batch_size x context_length tokens: the tensors
                 each block keeps for its backward (below), then at the first of the step's two
                 peaks the loss's (a T x vocab fp32 log-softmax and its two T x vocab fp32
                 gradients), at the second one block's recomputation (checkpointing) and
                 gradient. bf16 autocast (ddp) also keeps bf16 copies of the weights for the
                 backward unless blocks are checkpointed.

The plan is the larger of the two peaks, communication and activations at that moment (fsdp's
unsharded gradients exist only in the backward).

What a block keeps, counted from the operations the eager model runs (e: compute-dtype
bytes; r: the residual stream's, fp32 under autocast; d model width, q/kv the query and
key/value widths, f the MLP width): the norms' inputs (RMSNorm: and its normalized input),
the matmul inputs and the fused QKV output (T(2d + q + 2kv)e + Tq e attention output), the
rotated queries and keys (Llama), and the MLP's intermediate tensors (GPT-2: fc output and
GELU output, 2Tf e; Llama: [gate; up], SiLU(gate) and the product, 4Tf e). Full
checkpointing keeps only the block's input (T d r); selective keeps it and the matmul and
attention outputs. torch.compile saves less than this (it fuses element-wise work).

The estimate is checked against memory measured on CPU (tests/test_plan.py,
benchmarks/bench_fsdp_memory.py). "Fits" leaves 10% of the device free for the CUDA
context, kernel workspaces and allocator fragmentation.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from gptrain.cli import add_documented_command
from gptrain.config import RunConfig, load_config
from gptrain.errors import GptrainError
from gptrain.models.config import ModelConfig

GIB = 2**30
FREE_FRACTION = 0.10  # of device memory, kept free for the CUDA context, workspaces, fragmentation
PARALLELISMS = ("ddp", "fsdp")
CHECKPOINTING = ("none", "full", "selective")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one rank needs; the largest rank's where shards differ in size."""

    parallelism: str
    activation_checkpointing: str
    world_size: int
    parameters: int
    gradients: int
    optimizer: int
    communication: int
    activations: int

    @property
    def states(self) -> int:
        """Parameters, gradients and optimizer state."""
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.communication + self.activations

    def fits(self, device_bytes: float) -> bool:
        return self.total <= (1 - FREE_FRACTION) * device_bytes


@dataclass(frozen=True)
class _ParameterCounts:
    shapes: list[tuple[int, ...]]  # every unique parameter (a tied weight once)
    block: int  # parameters of one transformer block
    root: int  # the rest: embeddings, final norm, output head
    block_matmuls: int  # weights of one block's Linear layers

    @property
    def total(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def per_rank(self, shards: int) -> int:
        """Elements one rank holds when every parameter is split in `shards` along dimension 0."""
        return sum(math.ceil(shape[0] / shards) * math.prod(shape[1:]) for shape in self.shapes)


def _count_parameters(model_config: ModelConfig) -> _ParameterCounts:
    import torch
    from torch import nn

    from gptrain.models.transformer import Transformer

    with torch.device("meta"):  # shapes only: planning llama3-8b allocates nothing
        model = Transformer(model_config)
    unique = {id(p): p for p in model.parameters()}.values()
    block = model.blocks[0]
    block_params = sum(p.numel() for p in block.parameters())
    matmuls = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
    total = sum(p.numel() for p in unique)
    return _ParameterCounts(
        shapes=[tuple(p.shape) for p in unique], block=block_params,
        root=total - model_config.n_layers * block_params, block_matmuls=matmuls,
    )


def plan_memory(
    config: RunConfig,
    world_size: int,
    device_type: str = "cuda",
    *,
    parallelism: str | None = None,
    activation_checkpointing: str | None = None,
) -> MemoryPlan:
    """The memory plan of `config` on `world_size` ranks of `device_type` devices; parallelism
    and activation checkpointing default to the config's."""
    train = config.train
    parallelism = parallelism or train.parallelism
    mode = activation_checkpointing or train.activation_checkpointing
    if world_size < 1:
        raise GptrainError(f"world size {world_size}: must be >= 1")
    mc = config.model.resolve()
    counts = _count_parameters(mc)
    bf16 = _plans_bf16(config, device_type)
    sharded = parallelism == "fsdp" and world_size > 1
    shards = (train.fsdp_shard_size or world_size) if sharded else 1
    held = counts.per_rank(shards)
    compute = 2 if bf16 else 4
    if sharded:
        # FSDP computes in bf16 throughout; autocast (ddp) keeps the residual stream in fp32.
        residual, weight_copies = compute, 0
        root = compute * counts.root  # gathered from the first forward to the end of the backward
        blocks = compute * counts.block * (2 if train.fsdp_reshard_after_forward else mc.n_layers)
        accumulated = 4 * counts.total if train.grad_accum_steps > 1 else 0
        block_gradients = compute * counts.root + (compute + 4) * counts.block
        at_loss = root + (0 if train.fsdp_reshard_after_forward else blocks) + accumulated
        in_backward = root + blocks + (accumulated or block_gradients)
    else:
        residual = 4
        at_loss = in_backward = 4 * counts.total if world_size > 1 else 0  # DDP's buckets, always there
        # Autocast's bf16 weight copies stay saved for the backward (recomputed when checkpointed).
        kept_blocks = mc.n_layers if mode == "none" else 1
        weight_copies = 2 * (kept_blocks * counts.block_matmuls + mc.vocab_size * mc.d_model) if bf16 else 0
    loss_peak, block_peak = activation_peaks(mc, train.micro_batch_size, compute, residual, mode)
    # The larger of the step's two peaks: the loss gradient (fsdp has gathered only the root and
    # no unsharded gradients yet) and a block's backward (its gradients are being reduced).
    communication, activations = max(
        (at_loss, weight_copies + loss_peak), (in_backward, weight_copies + block_peak), key=sum,
    )
    return MemoryPlan(
        parallelism=parallelism, activation_checkpointing=mode, world_size=world_size,
        parameters=4 * held, gradients=4 * held, optimizer=8 * held,
        communication=communication, activations=activations,
    )


def _plans_bf16(config: RunConfig, device_type: str) -> bool:
    if config.train.dtype != "auto":
        return config.train.dtype == "bf16"
    if device_type == "cuda":
        return True  # planning for GPUs from Ampere on (bf16 natively)
    from gptrain.device import has_native_bf16

    return has_native_bf16(device_type)


def activation_peaks(mc: ModelConfig, micro_batch: int, compute: int, residual: int, mode: str) -> tuple[int, int]:
    """Activation memory of one micro-batch at the two moments it peaks (see the module doc):
    the loss gradient at the start of the backward, and the backward of one block."""
    seq, tokens = mc.context_length, micro_batch * mc.context_length
    d, f = mc.d_model, mc.d_ff
    q, kv = mc.n_heads * mc.head_dim, mc.kv_heads * mc.head_dim
    llama = mc.family == "llama"
    norm = (2 if llama else 1) * tokens * d * residual
    logsumexp = micro_batch * mc.n_heads * seq * 4
    qkv_out, attention_out = tokens * (q + 2 * kv) * compute, tokens * q * compute
    fc_out = tokens * (2 * f if llama else f) * compute
    attention = tokens * d * compute + qkv_out + attention_out + logsumexp
    if llama:
        attention += tokens * (q + kv) * compute  # RoPE-rotated queries and keys
    mlp = tokens * d * compute + fc_out + tokens * f * compute * (2 if llama else 1)
    dropout_masks = 2 * tokens * d if mc.dropout > 0 else 0  # bool masks of the two residual dropouts
    block_all = 2 * norm + attention + mlp + dropout_masks
    block_input = tokens * d * residual
    cached = qkv_out + attention_out + logsumexp + fc_out  # selective: outputs it keeps...
    projections = 2 * tokens * d * compute  # ...and the two output projections' (not kept otherwise)
    kept = {"none": block_all, "full": block_input, "selective": block_input + cached + projections}[mode]
    recomputed = 0 if mode == "none" else block_all - block_input - (cached if mode == "selective" else 0)
    vocab = mc.vocab_size
    head_saved = norm + tokens * d * compute + tokens * vocab * 4
    loss_gradient = 2 * tokens * vocab * 4
    block_gradient = tokens * max(2 * f if llama else f, q + 2 * kv) * compute
    blocks = mc.n_layers * kept
    return blocks + head_saved + loss_gradient, blocks + recomputed + block_gradient


# ---------------------------------------------------------------------------------------------
# The command.


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_documented_command(
        subparsers, "plan", "memory per rank of a training config (ddp/fsdp, activation checkpointing)", __doc__,
    )
    parser.add_argument("--config", required=True, metavar="NAME_OR_FILE", help="a shipped preset or a YAML file/URL")
    parser.add_argument("--world-size", type=int, default=8, metavar="N", help="ranks (GPUs) in the job (default 8)")
    parser.add_argument("--device-memory", type=float, default=80.0, metavar="GIB",
                        help="memory of one device in GiB (default 80)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="what train.dtype=auto resolves to (cuda: bf16)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for gptrain train")
    parser.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    print(describe(config, args.world_size, args.device_memory * GIB, args.device))
    return 0


def describe(config: RunConfig, world_size: int, device_bytes: float, device_type: str = "cuda") -> str:
    """The plan of every parallelism x checkpointing combination as a table; `*` marks the config's own."""
    mc, train = config.model.resolve(), config.train
    precision = "bf16" if _plans_bf16(config, device_type) else "fp32"
    lines = [
        f"{config.model.name}: {mc.num_parameters(include_padding=True):,} parameters; micro-batch "
        f"{train.micro_batch_size} x {mc.context_length} tokens, {train.grad_accum_steps} accumulation step(s), "
        f"{precision}; {world_size} rank(s) of {device_bytes / GIB:g} GiB",
        f"{'':3}{'parallelism':<12}{'checkpointing':<14}" + "".join(
            f"{h:>12}" for h in ("params", "grads", "optimizer", "comm", "activations", "total")
        ) + "  fits (GiB per rank)",
    ]
    configured = (train.parallelism, train.activation_checkpointing)
    for parallelism in PARALLELISMS:
        for mode in CHECKPOINTING:
            plan = plan_memory(
                config, world_size, device_type, parallelism=parallelism, activation_checkpointing=mode,
            )
            values = (plan.parameters, plan.gradients, plan.optimizer, plan.communication, plan.activations, plan.total)
            mark = "*" if (parallelism, mode) == configured else ""
            lines.append(
                f"{mark:<3}{parallelism:<12}{mode:<14}" + "".join(f"{v / GIB:12.2f}" for v in values)
                + f"  {'yes' if plan.fits(device_bytes) else 'no'}"
            )
    lines.append(f"fits: total <= {1 - FREE_FRACTION:.0%} of the device (the rest for the CUDA context, "
                 "workspaces and fragmentation)")
    if config.optim.galore.enabled:
        lines.append("optimizer: planned as AdamW, an upper bound for GaLore's low-rank moments")
    return "\n".join(lines)

