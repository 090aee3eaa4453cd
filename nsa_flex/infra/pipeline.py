"""Pipeline parallelism for the nsa model: torchtitan's ``pipeline_llm`` with scaled gradients.

torchtitan 0.2.2's trainer divides the summed loss by the global number of tokens before
``backward`` when pipeline parallelism is off, but under pipeline parallelism the schedule runs
``backward`` on the summed loss itself (``scale_grads=False``) and only the *reported* loss is
divided. Gradients are then larger by that token count, so gradient clipping and the optimizer
see a different step than in the non-pipelined run. ``pipeline_nsa`` hands ``pipeline_llm`` a
loss whose value is unchanged (the reported loss stays right) and whose gradient is divided by
the global token count, which makes pipelined and non-pipelined training take the same steps.
"""

from __future__ import annotations

import torch

from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.tools.logging import logger


class GradScaledLoss:
    """``loss_fn`` with its value kept and its gradient multiplied by ``factor``."""

    def __init__(self, loss_fn, factor: float):
        self.loss_fn = loss_fn
        self.factor = factor
        self._warned = False

    def __call__(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self._warned and bool((labels == IGNORE_INDEX).any()):
            logger.warning("pipeline loss: some labels are ignored; gradients are scaled by the "
                           "global token count, not the count of valid tokens")
            self._warned = True
        loss = self.loss_fn(pred, labels)
        scaled = loss * self.factor
        return scaled + (loss - scaled).detach()


def pipeline_nsa(model, parallel_dims, job_config, device, model_args, parallelize_fn, loss_fn):
    """torchtitan PipeliningFunction: ``pipeline_llm`` with per-token gradient scaling."""
    training = job_config.training
    global_batch = training.global_batch_size
    if global_batch < 0:
        global_batch = training.local_batch_size * (parallel_dims.dp_replicate * parallel_dims.dp_shard)
    tokens = global_batch * training.seq_len
    return pipeline_llm(model, parallel_dims, job_config, device, model_args, parallelize_fn,
                        GradScaledLoss(loss_fn, 1.0 / tokens))
