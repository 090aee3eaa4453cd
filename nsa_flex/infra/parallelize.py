"""Parallelisation of the nsa model: llama3's recipe plus a TP plan for NSA's own parameters.

Activation checkpointing, per-block torch.compile, FSDP/HSDP and DDP are torchtitan's llama3
functions, applied unchanged (the module names match). Tensor parallelism uses llama3's plan
for wq/wk/wv/wo and the feed-forward, and adds:

* ``attention.gate`` and the separate-branch projections ``attention.wk_cmp/wv_cmp/wk_swa/wv_swa``:
  column-wise (whole heads per rank; the gate's outputs are laid out head-major);
* ``attention.compress_k/compress_v`` (φ, shared by all KV heads): parameters replicated as
  DTensors on the TP mesh; each rank runs φ on its local heads with local views of the
  parameters whose gradients are marked partial, so the TP ranks' contributions are summed
  before the optimizer sees them (as torchtitan does for replicated norm weights).

Context parallelism is refused (see ``NSAModelArgs.update_from_config``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    parallelize_module,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.nn.utils.stateless import _reparametrize_module

from torchtitan.config import JobConfig, TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.tensor_parallel import maybe_enable_async_tp
from torchtitan.models.llama3.infra.parallelize import (
    _op_sac_save_list,
    apply_compile,
    apply_ddp,
    apply_fsdp,
)
from torchtitan.tools.logging import logger

from nsa_flex import patches
from nsa_flex.cpu import has_accelerator

NSA_COLWISE = ("gate", "wk_cmp", "wv_cmp", "wk_swa", "wv_swa")
NSA_REPLICATED = ("compress_k", "compress_v")


class ReplicateLocalCompute(ParallelStyle):
    """Replicated parameters, computed on each rank's local (head-sharded) activations.

    For modules applied identically to every head (φ): the parameters become ``Replicate``
    DTensors; forward runs the module's own code on plain tensors, with each parameter
    replaced by ``p.to_local(grad_placements=[Partial()])`` so that the gradient flowing back is
    a partial sum over the TP ranks, reduced when the optimizer or FSDP reads it.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for sub in module.modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                if not isinstance(p, DTensor):
                    sub.register_parameter(name, nn.Parameter(
                        distribute_tensor(p.data, device_mesh, [Replicate()]),
                        requires_grad=p.requires_grad))
        inner_forward = module.forward

        def forward(*args, **kwargs):
            local = {
                n: (p.to_local(grad_placements=[Partial()]) if isinstance(p, DTensor) else p)
                for n, p in module.named_parameters()
            }
            with _reparametrize_module(module, local):
                return inner_forward(*args, **kwargs)

        module.forward = forward
        return module


def parallelize_nsa(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig):
    """torchtitan ParallelizeFunction for the nsa model (TP, AC, compile, FSDP/DDP)."""
    if job_config.training.seq_len % parallel_dims.seq_len_divisor:
        raise ValueError(
            f"training.seq_len={job_config.training.seq_len} must be divisible by "
            f"{parallel_dims.seq_len_divisor} (the TP degree {parallel_dims.tp} times 2 x the CP "
            f"degree {parallel_dims.cp})")
    if parallel_dims.cp_enabled:
        raise NotImplementedError("the nsa model does not support context parallelism")

    if parallel_dims.tp_enabled:
        enable_float8_linear = "float8" in job_config.model.converters
        float8_is_rowwise = job_config.quantize.linear.float8.recipe_name in (
            "rowwise", "rowwise_with_gw_hp")
        tp_mesh = parallel_dims.get_mesh("tp")
        apply_tp(
            model, tp_mesh,
            loss_parallel=not job_config.parallelism.disable_loss_parallel,
            enable_float8_tensorwise_tp=enable_float8_linear and not float8_is_rowwise,
        )
        maybe_enable_async_tp(job_config, tp_mesh)

    model_compile_enabled = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        apply_ac(model, job_config.activation_checkpoint,
                 model_compile_enabled=model_compile_enabled,
                 op_sac_save_list=_op_sac_save_list,
                 base_folder=job_config.job.dump_folder)
    if model_compile_enabled:
        if torch.cuda.is_available():   # the Inductor patches the operator's kernels need
            patches.install()
        apply_compile(model, job_config.compile)

    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        apply_fsdp(
            model, parallel_dims.get_mesh(names),
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            pp_enabled=parallel_dims.pp_enabled,
            cpu_offload=job_config.training.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
        )
        if not has_accelerator():
            # gloo has no PREMUL_SUM/AVG reductions: reduce with SUM, then scale
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.set_force_sum_reduction_for_comms(True)
        logger.info("Applied %s to the model", "HSDP" if parallel_dims.dp_replicate_enabled else "FSDP")
    elif parallel_dims.dp_replicate_enabled:
        dp_replicate_mesh = parallel_dims.get_mesh("dp_replicate")
        if parallel_dims.world_size != dp_replicate_mesh.size():
            raise RuntimeError("DDP has not supported > 1D parallelism")
        apply_ddp(model, dp_replicate_mesh, enable_compile=model_compile_enabled)
    return model


def block_tp_plan(block: nn.Module, rowwise=RowwiseParallel, colwise=ColwiseParallel,
                  prepare_input=PrepareModuleInput) -> dict[str, ParallelStyle]:
    """The TP plan of one NSA transformer block (llama3's, plus NSA's own parameters)."""
    plan: dict[str, ParallelStyle] = {
        "attention_norm": SequenceParallel(),
        "attention": prepare_input(
            input_layouts=(Shard(1), None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
        ),
        "attention.wq": colwise(),
        "attention.wk": colwise(),
        "attention.wv": colwise(),
        "attention.wo": rowwise(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": prepare_input(
            input_layouts=(Shard(1),),
            desired_input_layouts=(Replicate(),),
        ),
        "feed_forward.w1": colwise(),
        "feed_forward.w2": rowwise(output_layouts=Shard(1)),
        "feed_forward.w3": colwise(),
    }
    attention = block.attention
    for name in NSA_COLWISE:
        if getattr(attention, name, None) is not None:
            # the gate is a plain Linear with bias; float8 styles are for the big projections only
            plan[f"attention.{name}"] = ColwiseParallel() if name == "gate" else colwise()
    for name in NSA_REPLICATED:
        plan[f"attention.{name}"] = ReplicateLocalCompute()
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool,
             enable_float8_tensorwise_tp: bool) -> None:
    """Tensor (+ sequence) parallelism for the nsa model."""
    parallelize_module(
        model, tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(
                input_layouts=Shard(1),
                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                use_local_output=not loss_parallel,
            ),
        },
    )
    if enable_float8_tensorwise_tp:
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )

        styles = dict(rowwise=Float8RowwiseParallel, colwise=Float8ColwiseParallel,
                      prepare_input=PrepareFloat8ModuleInput)
    else:
        styles = {}
    for block in model.layers.values():
        parallelize_module(module=block, device_mesh=tp_mesh,
                           parallelize_plan=block_tp_plan(block, **styles))
    logger.info("Applied %sTensor Parallelism to the nsa model (gates, φ and separate "
                "branch projections included)",
                "Float8 tensorwise " if enable_float8_tensorwise_tp else "")
