"""Scaling a vitx network beyond one device's memory and speed, per unit: activation checkpointing,
torch.compile, and fully sharded data parallelism (FSDP2) under Lightning's ModelParallelStrategy.

The unit is what a network lists in `scaling_units()`: the pre-norm transformer blocks of a ViT, of DeiT's student
and of both CLIP towers, the residual stages of a ResNet. So the same code serves every family:

* activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost") is a flag of the
  network's forward, `set_grad_checkpointing` (timm's API): a unit keeps only its input for the backward pass and
  recomputes its activations there, trading about one extra forward (~+33% compute) for memory that no longer
  grows with depth. Module tree, parameter names and state dicts are unchanged.
* torch.compile per unit (`nn.Module.compile`, in place, names unchanged): fuses the norms, GELU and residual adds
  around the matmuls. Per unit rather than per model (as torchtitan does): units of one shape share a compiled
  graph, and it composes with sharding and checkpointing of the same units. On one device or under DDP the whole
  network can be compiled instead (`CompileBlocks(scope="model")`): one graph from the patch embedding to the
  loss's logits, so the embedding, the final norm and the heads are fused too and there are no graph breaks
  between blocks; it compiles longer (one graph per network instead of one per distinct unit).
* FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023, "PyTorch FSDP"): each unit is its own shard
  group (its parameters are all-gathered just before its forward and backward and freed after); each tower (a
  sub-network with units of its own, such as CLIP's image and text transformers) and then the root hold the rest
  (embeddings, norms, heads). Lightning's ModelParallelStrategy builds a device mesh of (data_parallel = nodes,
  tensor_parallel = devices per node); vitx has no tensor parallelism, so it shards over the second dimension and
  replicates over the first: on one node that is plain FSDP, across nodes hybrid sharding (HSDP).

The callbacks are what `conf/trainer/activation_checkpointing.yaml` and `compile.yaml` add; every vitx task has
the `configure_model` hook that ModelParallelStrategy calls (`conf/trainer/fsdp.yaml`), in the task core.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info

# entry points other than forward() that code calls on a sharded module; FSDP2 must gather around them too
FORWARD_METHODS = (
    "forward_features", "forward_head", "forward_distill_heads", "image_features", "encode_image", "encode_text",
)


def scaling_units(module: nn.Module) -> list[nn.Module]:
    """The units of a network (its `scaling_units()`), or [] for a module that names none."""
    units = getattr(module, "scaling_units", None)
    return list(units()) if callable(units) else []


def compile_units(module: nn.Module, **compile_kwargs) -> int:
    """torch.compile every unit of `module` in place; returns the number of units. `compile_kwargs` go to
    torch.compile."""
    units = scaling_units(module)
    if not units:
        raise ValueError(f"{type(module).__name__} names no scaling units to compile")
    for unit in units:
        unit.compile(**compile_kwargs)
    return len(units)


def compile_network(module: nn.Module, entry_points: tuple[str, ...] = ("forward",), **compile_kwargs) -> int:
    """torch.compile a whole network in place: `forward` through `nn.Module.compile` (parameter names and state
    dict unchanged), any other method in `entry_points` (what a task's training step calls instead of forward,
    e.g. DeiT's forward_features) as an instance attribute over the class's method. Returns the number of
    entry points compiled."""
    for name in entry_points:
        if name == "forward":
            module.compile(**compile_kwargs)
        else:
            setattr(module, name, torch.compile(getattr(module, name), **compile_kwargs))
    return len(entry_points)


# -- the Lightning callbacks that the overlays add ------------------------------------------------------------


class ActivationCheckpointing(L.Callback):
    """Activation checkpointing of every unit of the task's network, switched on when the trainer sets the model
    up. Costs about a third more compute; saves most activation memory, which buys a larger per-device batch."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "set_grad_checkpointing", None)):
            raise TypeError(f"{type(pl_module).__name__} has no set_grad_checkpointing(); remove the overlay")
        n = pl_module.set_grad_checkpointing(True)
        rank_zero_info(f"activation checkpointing: {n} units")


class CompileBlocks(L.Callback):
    """torch.compile every unit of the task's network (transformer blocks, ResNet stages) at setup, or the whole
    network.

    Args:
        mode: torch.compile's mode: None (default), "reduce-overhead" (CUDA graphs) or "max-autotune".
        backend: "inductor" (generates fused kernels), or "eager" / "aot_eager" to check tracing only.
        fullgraph: fail instead of splitting a unit into several graphs.
        dynamic: False compiles for the shapes seen (a new shape, e.g. a smaller last batch, recompiles once).
        scope: "units" (each block on its own; composes with FSDP) or "model" (the whole network as one graph:
            fewer kernel launches around the blocks; one device or DDP, not FSDP, whose per-unit hooks it would
            trace through). `make gpu-check` measures one against the other.
    """

    SCOPES = ("units", "model")

    def __init__(self, mode: Optional[str] = None, backend: str = "inductor", fullgraph: bool = False,
                 dynamic: Optional[bool] = False, scope: str = "units") -> None:
        if scope not in self.SCOPES:
            raise ValueError(f"CompileBlocks scope must be one of {self.SCOPES}, got {scope!r}")
        self.kwargs = {"mode": mode, "backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}
        self.scope = scope

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        hook = "compile_units" if self.scope == "units" else "compile_model"
        if not callable(getattr(pl_module, hook, None)):
            raise TypeError(f"{type(pl_module).__name__} has no {hook}(); remove the overlay")
        if self.scope == "model" and type(trainer.strategy).__name__ == "ModelParallelStrategy":
            raise ValueError("CompileBlocks(scope='model') does not combine with FSDP (conf/trainer/fsdp.yaml): "
                             "FSDP gathers each unit's parameters in hooks around it; use scope 'units'")
        n = getattr(pl_module, hook)(**self.kwargs)
        rank_zero_info(f"torch.compile({self.kwargs}): {n} {'units' if self.scope == 'units' else 'entry points'}")


# -- FSDP2 -----------------------------------------------------------------------------------------------------


def fully_shard_units(root: nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: every unit its own shard group, then every tower inside `root`, then `root` itself for what is left.
    Methods in FORWARD_METHODS are registered so that calling them directly (CLIP's encode_image, an analysis
    callback's forward_features) gathers parameters like forward().

    mesh: a 1-D DeviceMesh to shard over, or 2-D (replicate, shard) for hybrid sharding (HSDP).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if isinstance(root, FSDPModule):  # configure_model runs again for every fit/validate call of a trainer
        return root
    units = scaling_units(root)
    if not units:
        raise ValueError(f"{type(root).__name__} names no scaling units; FSDP here shards per unit")
    # FSDP2 shards along dim 0, which a 0-d parameter (CLIP's temperature) lacks: such parameters stay whole on
    # every device, and their gradients are averaged over the devices here, as data parallelism would
    scalars = {p for p in root.parameters() if p.ndim == 0}
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grad)
    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(), "ignored_params": scalars or None}
    if kwargs["mp_policy"].param_dtype not in (None, torch.float32):
        # BatchNorm keeps fp32 parameters beside its fp32 running statistics (which FSDP does not cast): batch_norm
        # refuses bf16 weights with fp32 statistics, and takes a bf16 input with fp32 parameters as it comes
        keep_fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                         cast_forward_inputs=False)
        for bn in (m for m in root.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            fully_shard(bn, mesh=mesh, mp_policy=keep_fp32, reshard_after_forward=reshard_after_forward)
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **kwargs)
    towers = [m for m in root.modules() if m is not root and scaling_units(m)]
    _broadcast_batchnorm_statistics(root)
    for group in towers + [root]:
        # outside the units little is left (embeddings, norms, heads): kept gathered from forward to backward,
        # which the root needs first in backward anyway, and which lets a registered method (forward_features)
        # be called from inside forward() without resharding half-way through it
        fully_shard(group, reshard_after_forward=False, **kwargs)
        for name in FORWARD_METHODS:
            if callable(getattr(type(group), name, None)):
                register_fsdp_forward_method(group, name)
    return root


def _broadcast_batchnorm_statistics(root: nn.Module) -> None:
    """FSDP2 shards parameters but leaves buffers alone, so each rank would keep BatchNorm running statistics of
    its own batches (a ResNet teacher), and a checkpoint (written from rank 0) would not be the model the other
    ranks evaluate. As DDP does (broadcast_buffers), every forward of the root starts from rank 0's statistics."""
    stats = [b for m in root.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
    if not stats:
        return

    def broadcast(module: nn.Module, args) -> None:
        for buffer in stats:
            torch.distributed.broadcast(buffer, src=0)

    root.register_forward_pre_hook(broadcast)


def _average_grad(param: torch.Tensor) -> None:
    torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.AVG)


def shard_mesh(device_mesh):
    """Lightning's (data_parallel, tensor_parallel) mesh -> the mesh vitx shards over: the second dimension
    alone when the first has size 1 (FSDP within one node), else both as (replicate, shard) (HSDP)."""
    if device_mesh.ndim == 1:
        return device_mesh
    replicate, shard = device_mesh.mesh_dim_names
    return device_mesh[shard] if device_mesh[replicate].size() == 1 else device_mesh


def shard_network(module: nn.Module, device_mesh, precision: str) -> nn.Module:
    """fully_shard_units with the mixed-precision policy of the trainer's `precision`.

    Under bf16-mixed the gathered parameters are bf16 (half the all-gather traffic) while gradients are reduced
    and the optimizer steps in fp32; autocast still keeps norms and losses in fp32. fp16 needs gradient scaling,
    which vitx does not combine with FSDP2 sharding."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision.startswith("16"):
        raise ValueError(
            f"precision {precision!r} needs gradient scaling, which vitx does not combine with FSDP2 sharding; "
            "use conf/trainer/bf16.yaml with conf/trainer/fsdp.yaml, or fp16 with conf/trainer/ddp.yaml")
    if precision.startswith("bf16"):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    return fully_shard_units(module, shard_mesh(device_mesh), mp_policy=policy)
