"""Scaling a vitx model beyond one device's memory and speed, per transformer block: activation checkpointing,
torch.compile, and fully sharded data parallelism (FSDP2) under Lightning's ModelParallelStrategy.

The unit of all three is the pre-norm transformer `Block` (models/layers.py), found by type, so the same code
covers ViT, DeiT's student and both towers of CLIP:

* activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): a block keeps
  only its input for the backward pass and recomputes its activations there, trading about one extra forward
  (~+33% compute) for memory that no longer grows with depth. Applied by giving each block a class whose
  forward runs under torch.utils.checkpoint (non-reentrant, RNG state preserved, so dropout and stochastic
  depth draw the same masks in the recomputation); module tree, parameter names and state dicts are unchanged.
* torch.compile per block (`nn.Module.compile`, in place, names unchanged): fuses the norms, GELU and residual
  adds around the matmuls. Per block rather than per model (as torchtitan does): blocks of one shape share a
  compiled graph, and it composes with sharding and checkpointing of the same blocks.
* FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023, "PyTorch FSDP"): each block is its own shard
  unit (its parameters are all-gathered just before its forward and backward and freed after); each tower
  (CLIP's image and text transformers) and then the root hold the rest (embeddings, norms, heads). Lightning's ModelParallelStrategy builds a device
  mesh of (data_parallel = nodes, tensor_parallel = devices per node) by default; vitx has no tensor
  parallelism, so it shards over the second dimension and replicates over the first: on one node that is plain
  FSDP, across nodes it is hybrid sharding (HSDP: all-gathers stay on the node's fast links).

The callbacks are what the `conf/trainer/activation_checkpointing.yaml` and `compile.yaml` overlays add; the
`FullyShardable` mixin gives a task the `configure_model` hook that ModelParallelStrategy requires
(`conf/trainer/fsdp.yaml`).
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.checkpoint import checkpoint

from vit_experiments.models.layers import Block
from vit_experiments.models.text import TextTransformer
from vit_experiments.models.vit import VisionTransformer

# towers that are called on their own (CLIP's encode_image -> visual, analysis callbacks -> a ViT's
# forward_features) and so get their own shard unit, whose hooks gather their non-block parameters
TOWER_TYPES = (VisionTransformer, TextTransformer)
# entry points other than forward() that code calls on a sharded module; FSDP2 must gather around them too
FORWARD_METHODS = (
    "forward_features", "forward_head", "forward_distill_heads", "image_features", "encode_image", "encode_text",
)


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """Every transformer Block inside `module`, in registration order."""
    return [m for m in module.modules() if isinstance(m, Block)]


# -- activation checkpointing -------------------------------------------------------------------------------


class _CheckpointedForward:
    """Placed in front of a block's own class: the forward pass keeps only the block's inputs."""

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and analysis: nothing to save memory on
            return super().forward(*args, **kwargs)
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


_checkpointed_classes: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """cls -> a subclass of it whose forward runs under checkpoint (made once per class, so that
    isinstance(block, Block) and every attribute of the block stay as they were)."""
    if cls not in _checkpointed_classes:
        _checkpointed_classes[cls] = type(f"Checkpointed{cls.__name__}", (_CheckpointedForward, cls), {})
    return _checkpointed_classes[cls]


def is_checkpointed(block: nn.Module) -> bool:
    return isinstance(block, _CheckpointedForward)


def apply_activation_checkpointing(module: nn.Module) -> int:
    """Checkpoint every transformer Block of `module` in place; returns how many blocks are checkpointed.

    Call before sharding (fully_shard also specialises the block's class, on top of this one). Idempotent.
    """
    blocks = transformer_blocks(module)
    for block in blocks:
        if not is_checkpointed(block):
            block.__class__ = _checkpointed_class(type(block))
    return len(blocks)


def remove_activation_checkpointing(module: nn.Module) -> None:
    """Undo apply_activation_checkpointing (on a module that has not been sharded since)."""
    for block in transformer_blocks(module):
        if is_checkpointed(block):
            block.__class__ = next(c for c in type(block).__mro__[1:] if not issubclass(c, _CheckpointedForward))


# -- torch.compile ---------------------------------------------------------------------------------------------


def compile_blocks(module: nn.Module, **compile_kwargs) -> int:
    """torch.compile every transformer Block of `module` in place (nn.Module.compile keeps parameter names, so
    checkpoints are unaffected); returns the number of blocks. `compile_kwargs` go to torch.compile."""
    blocks = transformer_blocks(module)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


# -- the Lightning side ----------------------------------------------------------------------------------------


def _require_blocks(pl_module: L.LightningModule, what: str) -> None:
    if not transformer_blocks(pl_module):
        raise ValueError(
            f"{what} works per transformer block, but {type(pl_module).__name__} has no "
            "vit_experiments.models.layers.Block; remove the overlay for this model"
        )


class ActivationCheckpointing(L.Callback):
    """Activation checkpointing of every transformer block, applied when the trainer sets the model up (before
    any sharding or compiling). Costs about a third more compute; saves most activation memory, which buys a
    larger per-device batch."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _require_blocks(pl_module, "activation checkpointing")
        n = apply_activation_checkpointing(pl_module)
        rank_zero_info(f"activation checkpointing: {n} transformer blocks")


class CompileBlocks(L.Callback):
    """torch.compile every transformer block when the trainer sets the model up.

    Args:
        mode: torch.compile's mode: None (default), "reduce-overhead" (CUDA graphs) or "max-autotune".
        backend: "inductor" (generates fused kernels), or "eager" / "aot_eager" to check tracing only.
        fullgraph: fail instead of splitting a block into several graphs.
        dynamic: False compiles for the shapes seen (a new shape, e.g. a smaller last batch, recompiles once).
    """

    def __init__(
        self, mode: Optional[str] = None, backend: str = "inductor", fullgraph: bool = False,
        dynamic: Optional[bool] = False,
    ) -> None:
        self.kwargs = {"mode": mode, "backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _require_blocks(pl_module, "torch.compile per block")
        n = compile_blocks(pl_module, **self.kwargs)
        rank_zero_info(f"torch.compile({self.kwargs}): {n} transformer blocks")


def fully_shard_blocks(
    root: nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True
) -> nn.Module:
    """FSDP2: every transformer Block its own shard unit, then every tower (a ViT or text transformer inside
    `root`), then `root` itself for what is left. Methods in FORWARD_METHODS are registered so that calling them
    directly (CLIP's encode_image, an analysis callback's forward_features) gathers parameters like forward().

    mesh: a 1-D DeviceMesh to shard over, or 2-D (replicate, shard) for hybrid sharding (HSDP).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if isinstance(root, FSDPModule):  # configure_model runs again for every fit/validate call of a trainer
        return root
    # FSDP2 shards along dim 0, which a 0-d parameter (CLIP's temperature) lacks: such parameters stay whole on
    # every device, and their gradients are averaged over the devices here, as data parallelism would
    scalars = {p for p in root.parameters() if p.ndim == 0}
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grad)
    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(), "ignored_params": scalars or None}
    blocks = transformer_blocks(root)
    if not blocks:
        raise ValueError(f"{type(root).__name__} has no transformer Block to shard; FSDP here shards per block")
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    units = [m for m in root.modules() if isinstance(m, TOWER_TYPES) and m is not root] + [root]
    for unit in units:
        # outside the blocks little is left (embeddings, norms, heads): kept gathered from forward to backward,
        # which the root needs first in backward anyway, and which lets a registered method (forward_features)
        # be called from inside forward() without resharding half-way through it
        fully_shard(unit, reshard_after_forward=False, **kwargs)
        for name in FORWARD_METHODS:
            if callable(getattr(type(unit), name, None)):
                register_fsdp_forward_method(unit, name)
    return root


def _average_grad(param: torch.Tensor) -> None:
    torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.AVG)


def shard_mesh(device_mesh):
    """Lightning's (data_parallel, tensor_parallel) mesh -> the mesh vitx shards over: the second dimension
    alone when the first has size 1 (FSDP within one node), else both as (replicate, shard) (HSDP)."""
    if device_mesh.ndim == 1:
        return device_mesh
    replicate, shard = device_mesh.mesh_dim_names
    return device_mesh[shard] if device_mesh[replicate].size() == 1 else device_mesh


class FullyShardable:
    """Mixin for a vitx task (before L.LightningModule in its bases) whose trained network is `self.model`:
    the `configure_model` hook that Lightning's ModelParallelStrategy calls, sharding the network per
    transformer block with FSDP2. It does nothing under any other strategy.

    Under `precision: bf16-mixed` the gathered parameters are bf16 (half the all-gather traffic) while
    gradients are reduced and the optimizer steps in fp32; autocast still keeps norms and losses in fp32.
    Every trained parameter must be in a sharded module: nothing else synchronises gradients under this strategy.
    """

    def sharded_modules(self) -> list[nn.Module]:
        """The networks to shard, each its own FSDP2 root. Override to add copies that follow the trained one
        parameter by parameter, such as an exponential moving average (its `.module`), so both are sharded
        alike; a frozen teacher may stay whole on every device."""
        return [self.model]

    def configure_model(self) -> None:
        mesh = self.device_mesh  # set by ModelParallelStrategy only
        if mesh is None:
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy

        precision = str(self.trainer.precision)
        if precision.startswith("16"):
            raise ValueError(
                f"precision {precision!r} needs gradient scaling, which vitx does not combine with FSDP2 sharding; "
                "use conf/trainer/bf16.yaml with conf/trainer/fsdp.yaml, or fp16 with conf/trainer/ddp.yaml"
            )
        if precision.startswith("bf16"):
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()
        for module in self.sharded_modules():
            fully_shard_blocks(module, shard_mesh(mesh), mp_policy=policy)
