"""The torchtitan TrainSpec ``nsa`` and its registration.

``register()`` is idempotent; ``nsa_flex/__init__.py`` calls it when torchtitan is already
imported, so ``[experimental] custom_import = "nsa_flex"`` (or ``--experimental.custom_import
nsa_flex``) registers the spec inside ``torchrun -m torchtitan.train``. Registration also adds
the embedded datasets to torchtitan's registry and, on a machine without an accelerator, points
torchtitan at the CPU (``nsa_flex.cpu``).
"""

from __future__ import annotations

import torch
from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.components.validate import build_validator
from torchtitan.config import JobConfig
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.protocols import train_spec as train_spec_module
from torchtitan.protocols.train_spec import TrainSpec

from nsa_flex.data.datasets import register_datasets
from nsa_flex.data.tokenizer import load_tokenizer
from nsa_flex.hf import NSAStateDictAdapter
from nsa_flex.infra.parallelize import parallelize_nsa
from nsa_flex.infra.pipeline import pipeline_nsa
from nsa_flex.model import NSATransformer, nsa_flavors

SPEC_NAME = "nsa"


def check_job_config(job_config: JobConfig) -> None:
    """Stop at start on an unknown flavor or an invalid model configuration.

    torchtitan builds the tokenizer and the data loader before the model; this runs first (from
    the tokenizer builder) so that a bad configuration fails before any data is prepared.
    """
    import copy

    copy.deepcopy(nsa_flavors[job_config.model.flavor]).configure(job_config, log=False)
    check_compile_with_checkpointing(job_config, flex=torch.cuda.is_available())


def check_compile_with_checkpointing(job_config: JobConfig, flex: bool) -> None:
    """Inside a compiled model where NSA runs FlexAttention, allow only the checkpointing that was
    checked on a GPU: none, full, or selective (per-op, or every n-th block).

    Compiled model + checkpointing once gave wrong gradients on GPU (H100, torch 2.11): the
    BlockMask lists, recomputed inside the compiled graph, got a layout from Inductor that
    FlexAttention's kernels misread. ``backends.fixed_layout`` pins them row-major; since then
    ``tools/check_model.py`` on an H100 matches the eager model's gradients to 5.4e-7 (fp32) with
    no, full, per-op selective and every-2nd-block selective checkpointing (every n-th block wraps
    blocks the same way, fully checkpointed), and the 1b flavor trains at 32k with a sane grad
    norm. Memory-budget checkpointing (a partitioner choice the tool does not exercise) has not
    been checked, so it is refused there. On CPU the operator runs its dense path.
    """
    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    ac = job_config.activation_checkpoint
    if flex and compile_model and ac.mode not in ("none", "full", "selective"):
        raise ValueError(
            f"activation_checkpoint.mode={ac.mode!r} and compile.components="
            f"{list(job_config.compile.components)!r}: this checkpointing inside the compiled model "
            "is not verified on GPU for NSA (none, full and selective are, with "
            "tools/check_model.py). Use --activation_checkpoint.mode selective or full, or compile "
            "the loss only (--compile.components loss; the NSA operator is still compiled on its "
            "own).")


def build_nsa_tokenizer(job_config: JobConfig) -> BaseTokenizer:
    """Tokenizer from ``model.hf_assets_path``: 'embedded', an HF directory, or tiktoken."""
    check_job_config(job_config)
    return load_tokenizer(job_config.model.hf_assets_path)


def get_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=NSATransformer,
        model_args=nsa_flavors,
        parallelize_fn=parallelize_nsa,
        pipelining_fn=pipeline_nsa,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_text_dataloader,
        build_tokenizer_fn=build_nsa_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
        build_validator_fn=build_validator,
        state_dict_adapter=NSAStateDictAdapter,
    )


def register() -> None:
    """Register the ``nsa`` TrainSpec, the dense baseline ``llama3_dense`` and the sliding-window
    control ``nsa_window`` (idempotent)."""
    from nsa_flex.cpu import use_cpu_if_no_accelerator

    register_datasets()
    use_cpu_if_no_accelerator()
    if SPEC_NAME not in train_spec_module._extra_train_specs:
        train_spec_module.register_train_spec(SPEC_NAME, get_train_spec())
    from nsa_flex import baseline

    if baseline.SPEC_NAME not in train_spec_module._extra_train_specs:
        train_spec_module.register_train_spec(baseline.SPEC_NAME, baseline.get_train_spec())
    from nsa_flex.window_only import register_window_only

    register_window_only()
