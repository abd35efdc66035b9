"""How the model runs on the ranks: activation checkpointing, torch.compile, DDP or FSDP2.

    parallel = parallelize(model, config, env, device)   # before the optimizer is built
    for each micro-batch:
        with parallel.gradient_sync(last_micro_batch), parallel.step_autocast():
            parallel.loss(parallel.module(x), y).backward()
        parallel.after_backward()
    grad_norm = parallel.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step(); parallel.after_weights_change()

With `train.dtype=bf16` in one process, `parallel.module` is by default a bf16 copy of the
model (`train.bf16_mode=bf16_copy`, gptrain.train.bf16_copy); the model keeps the fp32 weights.
`parallel.loss` is the token cross-entropy, compiled along with the model.

All wrapping happens here (as in torchtitan's `parallelize` module), in this order:

1. Activation checkpointing (`train.activation_checkpointing`), per transformer block:
   `full` keeps only a block's input and recomputes the rest in the backward pass;
   `selective` also keeps the outputs of the matmuls and of attention, so only the cheap
   element-wise work (norms, GELU/SiLU, residual adds, casts) is recomputed.
2. `torch.compile` (`train.compile`): the whole model under DDP or alone; each block on its
   own under FSDP, whose hooks run between the blocks.
3. `train.parallelism`:
   ddp   one process: the model as it is. Several: DistributedDataParallel, which
         all-reduces (averages) the gradients in the backward pass of the last micro-batch.
   fsdp  FSDP2 (`fully_shard`) on every block and then on the root (the embedding, final
         norm and output head; a tied head is the embedding's parameter, sharded once).
         Each rank keeps 1/N of the parameters, gradients and AdamW moments; a block's
         parameters are all-gathered for its forward and backward, and its gradients are
         reduce-scattered in fp32. With `train.dtype=bf16` FSDP's MixedPrecisionPolicy
         computes in bf16 from the fp32 master shards (no autocast). With
         `train.fsdp_shard_size=k` < N the mesh is 2-D (HSDP): sharded over k ranks,
         replicated over N/k groups, whose gradients are averaged after the reduce-scatter.
         A process without a process group (`gptrain train` alone) trains unsharded, as with
         ddp; one rank of a process group (a 1-GPU benchmark) runs FSDP over itself.

Accumulation: micro-batches before the last skip the gradient reduction (DDP's `no_sync`;
FSDP's `set_requires_gradient_sync(False)`, which accumulates unsharded fp32 gradients until
the last micro-batch reduce-scatters them). Clipping takes the norm over all ranks' shards.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from gptrain.config import RunConfig
from gptrain.distributed import DistEnv
from gptrain.errors import GptrainError
from gptrain.models.transformer import Transformer
from gptrain.train.bf16_copy import Bf16Copy


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The next-token cross-entropy (mean or sum over tokens), with the log-softmax taken in fp32
    over bf16 logits: the training loss and the validation loss."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


@dataclass
class Parallelized:
    module: nn.Module  # what the training step calls
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # token_cross_entropy, compiled or not
    # bf16 autocast for ddp (around evaluation forwards, and training forwards but a bf16 copy's);
    # FSDP casts through its policy.
    autocast: contextlib.AbstractContextManager
    description: str  # for the start-up log
    # Every forward is a collective (FSDP all-gathers the parameters): all ranks must run the
    # same forwards, text samples included.
    collective_forward: bool = False
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None
    bf16_copy: Bf16Copy | None = None  # train.bf16_mode=bf16_copy: `module` runs this copy

    def step_autocast(self) -> contextlib.AbstractContextManager:
        """Around a training forward: a bf16 copy computes in bf16 as it is."""
        return contextlib.nullcontext() if self.bf16_copy is not None else self.autocast

    def after_backward(self) -> None:
        """After each micro-batch's backward: its gradients reach the fp32 weights."""
        if self.bf16_copy is not None:
            self.bf16_copy.accumulate_gradients()

    def after_weights_change(self) -> None:
        """After each optimizer step and after loading weights: the copy computes with them."""
        if self.bf16_copy is not None:
            self.bf16_copy.refresh()

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: reduce its gradients across the
        ranks (`enabled`: the last micro-batch of a step) or only accumulate them."""
        if enabled or self.no_sync is None:
            return contextlib.nullcontext()
        return self.no_sync()

    @staticmethod
    def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Scale the gradients so that their global norm is at most `max_norm`; returns the norm
        before scaling (fp32, the same on every rank).

        Each row's norm (along dim 0, the dimension FSDP shards; a 1-D tensor's rows are its
        elements) is taken in fp32, and the rows' squares are summed in fp64, each rank over
        what it holds; under fsdp the ranks that share out a parameter then add up their sums.
        A row is whole on one rank and reduced alike however many rows sit beside it, so the
        norm comes out the same whether the gradients are whole (ddp) or sharded (fsdp): fp32
        sums over other spans differ in the last bit, and AdamW magnifies a clipping factor one
        bit apart into weight differences of ~1e-5 within 20 steps. (Squaring every element in
        fp64 does that too, at 7x the time: 0.44 s against 0.06 s for GPT-2's 50,304 x 768
        embedding on two CPU cores.)"""
        from torch.distributed.tensor import DTensor, Partial, Replicate

        parameters = [p for p in parameters if p.grad is not None]
        if not parameters:
            return torch.zeros(())
        squares = torch.zeros((), dtype=torch.float64, device=parameters[0].grad.device)
        sharded = None
        for param in parameters:
            grad = param.grad
            if isinstance(grad, DTensor):
                sharded, grad = grad, grad.to_local()
            rows = grad.flatten(1) if grad.ndim > 1 else grad.reshape(-1, 1)
            squares += torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).double().square().sum()
        if sharded is not None:  # a sum over the shard dimension of the mesh (not over replicas)
            placements = [Partial() if p.is_shard() else Replicate() for p in sharded.placements]
            squares = DTensor.from_local(squares, sharded.device_mesh, placements).full_tensor()
        total_norm = squares.sqrt().float()
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
        return total_norm


def parallelize(model: Transformer, config: RunConfig, env: DistEnv, device: torch.device) -> Parallelized:
    """Wrap `model` (built on the CPU) for training on `device`; it ends up there, sharded or not."""
    train = config.train
    bf16 = train.resolved_dtype(device.type) == "bf16"
    if train.activation_checkpointing != "none":
        apply_activation_checkpointing(model, train.activation_checkpointing)
    checkpointing = f"activation checkpointing {train.activation_checkpointing}"
    # Compiled, the loss reads the bf16 logits once and widens them inside its fused kernels:
    # no fp32 copy of the batch x context x vocab logits is written (GPT-2 at context 256,
    # batch 2 on 2 CPU cores: 45 ms forward and backward against 170 ms eager).
    loss = _compiled(token_cross_entropy, train.compile, device)
    if train.parallelism == "fsdp" and _has_process_group():
        if train.compile:
            for block in model.blocks:
                # In place: the block keeps its name, FSDP wraps the compiled module.
                block.compile(**_compile_options(device))
        mesh_text = shard_model(model, config, env, device, bf16)
        return Parallelized(
            model, loss, contextlib.nullcontext(), f"{mesh_text}; {checkpointing}", collective_forward=True,
            no_sync=functools.partial(_fsdp_no_sync, model),
        )
    model.to(device)
    if bf16 and train.bf16_mode == "bf16_copy" and env.world_size == 1:
        bf16_copy = Bf16Copy(model)
        wrapped = _compiled(bf16_copy.module, train.compile, device)
        description = f"one process, bf16 copy of the fp32 weights; {checkpointing}"
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)  # evaluation reads the fp32 weights
        return Parallelized(wrapped, loss, autocast, description, bf16_copy=bf16_copy)
    # Several DDP ranks autocast: DDP would all-reduce a bf16 copy's gradients in bf16.
    wrapped: nn.Module = _compiled(model, train.compile, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    if env.world_size == 1:
        return Parallelized(wrapped, loss, autocast, f"one process; {checkpointing}")
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters=True also stops DDP from re-bucketing the gradients after the
    # first step. A resumed run's first step would otherwise all-reduce in the initial
    # bucket layout: with more than 2 ranks that sums in another order, and the weights
    # would drift from an uninterrupted run's in the last bits. (One autograd-graph
    # traversal per step.)
    ddp = DistributedDataParallel(
        wrapped, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
    )
    return Parallelized(ddp, loss, autocast, f"ddp over {env.world_size} ranks; {checkpointing}", no_sync=ddp.no_sync)


def _compile_options(device: torch.device) -> dict:
    """torch.compile's options. On CPU, random ops (the dropout masks' keys, or with
    `model.dropout_masks=aten` the masks themselves) come from aten's kernels as in eager mode
    (`fallback_random`): Inductor's own generator, element by element, cost GPT-2 124M 0.15 s
    more per step (context 256, batch 2, 2 cores). CUDA keeps Inductor's fused Philox."""
    return {"options": {"fallback_random": True}} if device.type == "cpu" else {}


def _compiled(target, enabled: bool, device: torch.device):
    """`target` (a module or a function) under torch.compile when `train.compile` is on."""
    return torch.compile(target, **_compile_options(device)) if enabled else target


def _has_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def shard_model(model: Transformer, config: RunConfig, env: DistEnv, device: torch.device, bf16: bool) -> str:
    """fully_shard every block, then the root; returns a description of the layout."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    train, world = config.train, env.world_size
    shard = train.fsdp_shard_size or world
    if shard > world or world % shard:
        raise GptrainError(f"train.fsdp_shard_size={train.fsdp_shard_size} must divide the number of ranks ({world})")
    if shard == world:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
        layout = f"fsdp over {world} ranks"
    else:
        mesh = init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))
        layout = f"hsdp: {world // shard} replicas, each sharded over {shard} ranks"
        # The mesh's sub-groups are new process groups, created with torch's default timeout
        # (gloo 30 min, NCCL 10 min): give them comm.timeout_s so a dead peer ends the step
        # as quickly in a replica or shard group as in the world group.
        for dim in ("replicate", "shard"):
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=config.comm.timeout_s), mesh.get_group(dim))
    # bf16 compute from fp32 master shards; gradients reduced (and accumulated) in fp32.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    options = {"mesh": mesh, "reshard_after_forward": train.fsdp_reshard_after_forward}
    if policy is not None:
        options["mp_policy"] = policy
    for block in model.blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)  # the rest: embeddings, final norm, head (moved to `device` with the shards)
    precision = "bf16 compute, fp32 master weights and reductions" if bf16 else "fp32"
    reshard = "resharded after forward" if train.fsdp_reshard_after_forward else "kept gathered until backward"
    return f"{layout} ({precision}; parameters {reshard})"


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ---------------------------------------------------------------------------------------------
# Activation checkpointing.


def _kept_by_selective_checkpointing() -> set:
    """The ops whose outputs selective checkpointing keeps: matmuls (Linear is mm or addmm)
    and attention (each backend's kernel), the expensive part of a block to recompute."""
    aten = torch.ops.aten
    names = (
        "mm", "addmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    )
    return {getattr(aten, name).default for name in names if hasattr(aten, name)}


def _selective_policy(kept: set, ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in kept else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """Replace each block by a checkpointed wrapper of it. The wrapper's state-dict hooks (and
    torch.distributed.checkpoint) drop its name from the keys: checkpoints look the same
    with and without it. Recomputation replays the forward's RNG state (dropout masks)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    options = {}
    if mode == "selective":
        policy = functools.partial(_selective_policy, _kept_by_selective_checkpointing())
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    for index, block in enumerate(model.blocks):
        model.blocks[index] = checkpoint_wrapper(block, preserve_rng_state=True, **options)
