"""Distil the ground-truth EU into `hf_eu.eu_head.EUHead`: a `Trainer` whose model is the head.

The rows are answer tokens with the target's features (`hf_eu.eu_features`, columns `values`, `topk_ids`,
`topk_logps`) and the 16-copy ground truth (`labels`), as `trainers.eu_head_data` writes them. The target
itself is not trained and not part of the Trainer's model: the head reads its output-head weight by
reference (`EUHead.attach`), so checkpoints and `save_model` hold only the head's few hundred kB.

`compute_loss` is the regression of `EUHeadConfig`'s docstring; `set_input_statistics` standardizes the
head's inputs on the training rows before training.
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from transformers import Trainer

from hf_eu.eu_features import TargetFeatures
from hf_eu.eu_head import EUHead

from .checkpoints import CheckedResumeMixin
from .eu_head_config import EUHeadConfig

__all__ = ["EUHeadTrainer", "eu_head_dataset", "set_input_statistics", "batch_features"]


def eu_head_dataset(data: dict[str, np.ndarray]) -> Dataset:
    """A `datasets.Dataset` of answer tokens from `trainers.eu_head_data.load_data`'s arrays."""
    return Dataset.from_dict({"values": data["values"], "topk_ids": data["topk_ids"].astype(np.int64),
                              "topk_logps": data["topk_logps"], "labels": data["ground_truth"]}).with_format("torch")


def batch_features(inputs: dict[str, torch.Tensor]) -> TargetFeatures:
    """The `TargetFeatures` of a collated batch `(N, ·)`."""
    return TargetFeatures(inputs["values"].float(), inputs["topk_ids"].long(), inputs["topk_logps"].float())


@torch.no_grad()
def set_input_statistics(head: EUHead, dataset: Dataset, max_rows: int = 20_000) -> None:
    """Set the head's input mean and std from (at most `max_rows` of) the training rows."""
    rows = dataset[: min(len(dataset), max_rows)]
    inputs = head.inputs(batch_features(rows)).double()  # (N, F + q)
    head.input_mean.copy_(inputs.mean(0).float())
    head.input_std.copy_(inputs.std(0).clamp_min(1e-6).float())


class EUHeadTrainer(CheckedResumeMixin, Trainer):
    """Trains an `EUHead` (attached to its target) on ground-truth EU; see the module docstring."""

    _tag_names = ["hf_eu", "eu-head", "uncertainty-distillation"]
    _name = "EU head"

    def __init__(self, model: EUHead, args: EUHeadConfig, train_dataset: Dataset, **kwargs):
        if not isinstance(model, EUHead):
            raise TypeError(f"`model` must be an hf_eu.eu_head.EUHead, got {type(model).__name__}.")
        if not isinstance(args, EUHeadConfig):
            raise TypeError(f"`args` must be an EUHeadConfig, got {type(args).__name__}.")
        if model.num_directions and not model.is_attached:
            raise ValueError("Attach the head to its target first (`head.attach(target)`): it reads the output head.")
        missing = {"values", "topk_ids", "topk_logps", "labels"} - set(train_dataset.column_names)
        if missing:
            raise ValueError(f"`train_dataset` lacks columns {sorted(missing)}; build it with `eu_head_dataset`.")
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        truth = inputs["labels"].float()  # (N,)
        log_eu = model.log_eu(batch_features(inputs))  # (N,)
        log_error = (log_eu - torch.log(truth + self.args.eu_floor)).square()
        raw_error = (log_eu.clamp(max=20.0).exp() - truth).square()
        per_token = self.args.log_loss_weight * log_error + self.args.raw_loss_weight * raw_error  # (N,)
        loss = per_token.sum() / num_items_in_batch if num_items_in_batch else per_token.mean()
        return (loss, {"eu": log_eu.exp()}) if return_outputs else loss
