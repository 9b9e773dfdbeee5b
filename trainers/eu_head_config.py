"""Configuration of the distilled EU head's training: `EUHeadConfig`, beside `eu_head_trainer.py`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

__all__ = ["EUHeadConfig"]


@dataclass
class EUHeadConfig(TrainingArguments):
    """`TrainingArguments` plus the fields of the EU head's regression on the ground truth.

    The loss of a batch of tokens with ground truth g and predicted log EU s (`EUHead.log_eu`) is

        log_loss_weight · mean[(s − log(g + eu_floor))²] + raw_loss_weight · mean[(exp(s) − g)²]

    The log term ranks tokens (it weighs a 0.01-nat token like a 1-nat one); the raw term, in nats², keeps the
    scale right for RMSE (EU here is ~0.1 nats, so its squares are ~0.01: weight it ~100 to balance).

    Args:
        log_loss_weight (`float`, defaults to `1.0`): weight of the squared error of log EU.
        raw_loss_weight (`float`, defaults to `100.0`): weight of the squared error in nats.
        eu_floor (`float`, defaults to `1e-3`): added to the ground truth inside the log, in nats.
    """

    log_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the squared error of log EU."})
    raw_loss_weight: float = field(default=100.0, metadata={"help": "Weight of the squared error in nats."})
    eu_floor: float = field(default=1e-3, metadata={"help": "Added to the ground truth inside the log (nats)."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Keep the feature columns (the head's forward takes one TargetFeatures, not named columns)."})

    def __post_init__(self):
        super().__post_init__()
        if self.log_loss_weight < 0 or self.raw_loss_weight < 0 or self.log_loss_weight + self.raw_loss_weight == 0:
            raise ValueError(f"`log_loss_weight` and `raw_loss_weight` must be ≥ 0 and not both 0, got "
                             f"{self.log_loss_weight} and {self.raw_loss_weight}.")
        if not self.eu_floor > 0:
            raise ValueError(f"`eu_floor` must be > 0, got {self.eu_floor}.")
