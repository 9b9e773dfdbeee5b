# /// script
# dependencies = ["hf_eu", "reasoning-gym>=0.1.20"]
# ///
"""Train the distilled EU head on ground-truth data and add it to a composite.

Usage (the shipped head; data from `python -m trainers.eu_head_data`, training about a minute on 2 CPU cores):

    python -m trainers.run_eu_head --data_dir .train-defaults/eu-head-data .train-defaults/eu-head-data-2 --output_dir .train-defaults/eu-head \\
        --composite hf_eu/defaults/smollm2-135m-instruct --composite_output_dir .train-defaults/eu-head-composite \\
        --num_train_epochs 30 --per_device_train_batch_size 256 --learning_rate 3e-3

The variant that also reads the OSD proxy's entropy (estimator `eu_head_proxy`, one proxy pass more): add
`--proxy_from hf_eu/defaults/smollm2-135m-instruct` (the composite whose proxy it reads; its entropy on every
training token is computed once per folder and cached there); with `--composite`, the trained head becomes the
composite head's `proxy_head` and the composite's own head is kept.

On a GPU, for your own target: generate the data with `--target your/model` (the 16 perturbed passes are the
cost; a few thousand answers take minutes on one GPU), then train here with `--target your/model`; the head
trains in seconds either way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from transformers import HfArgumentParser

from hf_eu.eu_features import feature_names
from hf_eu.eu_head import PROXY_ENTROPY, EUHead

from .eu_head_config import EUHeadConfig
from .eu_head_data import load_data, proxy_entropy_column
from .eu_head_trainer import EUHeadTrainer, eu_head_dataset, set_input_statistics
from .script_utils import load_target

__all__ = ["EUHeadScriptArguments", "train_eu_head", "main"]


@dataclass
class EUHeadScriptArguments:
    """Arguments of `python -m trainers.run_eu_head` besides `EUHeadConfig`."""

    data_dir: list[str] = field(metadata={"help": "Folder(s) written by trainers.eu_head_data (their rows are joined)."})
    target: str = field(default="embedded", metadata={"help": "The target the data was made with."})
    num_directions: int = field(default=16, metadata={"help": "Learned logit directions q of the head."})
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64], metadata={"help": "Perceptron widths."})
    holdout_fraction: float = field(default=0.0, metadata={
        "help": "Answers held out (by answer) to report validation Spearman/RMSE; 0 trains on all."})
    composite: str | None = field(default=None, metadata={"help": "Composite folder to add the head to."})
    composite_output_dir: str | None = field(default=None, metadata={"help": "Where the composite with the head goes."})
    seed_split: int = field(default=0, metadata={"help": "Seed of the holdout split."})
    allow_partial: bool = field(default=False, metadata={"help": "Train on the finished batches of an unfinished "
                                                                   "data folder (recorded in the head's info)."})
    ground_truth_copies: int = field(default=16, metadata={
        "help": "Put every folder's labels on the scale of the MI of this many perturbed copies (the evaluation's "
                "ground truth: 16), so folders made with other `num_perturbed` can train together."})
    proxy_from: str | None = field(default=None, metadata={
        "help": "Composite whose OSD proxy's entropy is an extra input: trains the `proxy_head` of `eu_head_proxy`."})
    proxy_dtype: str | None = field(default=None, metadata={
        "help": "Dtype of `proxy_from`'s proxy for the entropies ('float32', 'bfloat16', 'float16'; default: the "
                "composite's `proxy_dtype`). The shipped proxy head read the float32 proxy."})


def _split(data: dict[str, np.ndarray], fraction: float, seed: int):
    answers = np.unique(data["answer_index"])
    held = set(np.random.default_rng(seed).permutation(answers)[: int(round(fraction * len(answers)))].tolist())
    mask = np.array([a in held for a in data["answer_index"]])
    return ({k: v[~mask] for k, v in data.items()}, {k: v[mask] for k, v in data.items()} if mask.any() else None)


def _validation(head: EUHead, rows: dict[str, np.ndarray]) -> dict[str, float]:
    import torch
    from scipy.stats import spearmanr

    from .eu_head_trainer import batch_features

    dataset = eu_head_dataset(rows)
    with torch.no_grad():
        predicted = head(batch_features(dataset[:])).double().numpy()
    truth = rows["ground_truth"]
    return {"tokens": int(len(truth)), "spearman": round(float(spearmanr(predicted, truth)[0]), 4),
            "rmse": round(float(np.sqrt(np.mean((predicted - truth) ** 2))), 5)}


def train_eu_head(script: EUHeadScriptArguments, config: EUHeadConfig, proxy=None) -> EUHead:
    """Train a head on `script.data_dir` (see the module docstring); returns it, attached to the target.

    With `script.proxy_from` (a composite folder) or `proxy` (the OSD proxy itself), the head is a proxy head: its
    inputs end with the proxy's entropy (`PROXY_ENTROPY`), for `EUHead.set_proxy_head` and `eu_head_proxy`.
    """
    target = load_target(script.target)
    parts = [load_data(folder, allow_partial=script.allow_partial, ground_truth_copies=script.ground_truth_copies)
             for folder in script.data_dir]
    names = feature_names(target)
    if script.proxy_from and proxy is None:
        proxy = _composite(script.proxy_from, target, proxy_dtype=script.proxy_dtype).proxy
        if proxy is None:
            raise ValueError(f"The composite {script.proxy_from!r} has no proxy; `--proxy_from` needs one.")
    if proxy is not None:
        for folder, part in zip(script.data_dir, parts):
            column = proxy_entropy_column(folder, target, proxy, part["answer_index"])  # (N,)
            part["values"] = np.concatenate([part["values"], column[:, None]], 1)  # (N, F + 1)
        names = names + [PROXY_ENTROPY]
    for number, part in enumerate(parts):  # answers of different folders stay apart in the holdout split
        part["answer_index"] = part["answer_index"] + 1_000_000 * number
    data = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    train_rows, held_rows = _split(data, script.holdout_fraction, script.seed_split)
    settings = [json.load(open(os.path.join(folder, "settings.json"))) for folder in script.data_dir]
    if len({s["target_fingerprint"] for s in settings}) > 1:
        raise ValueError(f"The folders {script.data_dir} were made with different targets; train on one target's data.")
    info = {"data": script.data_dir, "tokens": int(len(train_rows["ground_truth"])),
            "ground_truth_copies": script.ground_truth_copies,
            "answers": int(len(np.unique(train_rows["answer_index"]))), "data_settings": settings,
            "loss": {"log_loss_weight": config.log_loss_weight, "raw_loss_weight": config.raw_loss_weight,
                     "eu_floor": config.eu_floor},
            "steps": {"epochs": config.num_train_epochs, "batch_size": config.per_device_train_batch_size,
                      "learning_rate": config.learning_rate, "seed": config.seed},
            **({"proxy_from": script.proxy_from or "the composite's proxy"} if proxy is not None else {})}
    head = EUHead(names, target.get_output_embeddings().weight.shape[1], script.num_directions,
                  tuple(script.hidden_sizes), top_k=train_rows["topk_ids"].shape[1], info=info).attach(target)
    dataset = eu_head_dataset(train_rows)
    set_input_statistics(head, dataset)
    trainer = EUHeadTrainer(model=head, args=config, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    head.eval()
    if held_rows is not None:
        head.info["validation"] = _validation(head, held_rows)
        print("validation", head.info["validation"])
    head.save(os.path.join(config.output_dir, "eu_head"))
    return head


def _composite(folder: str, target, proxy_dtype: str | None = None):
    from hf_eu import UncertaintyAwareModelForCausalLM

    extra = {"proxy_dtype": proxy_dtype} if proxy_dtype is not None else {}
    return UncertaintyAwareModelForCausalLM.from_pretrained(folder, target=target, **extra)


def _add_to_composite(head: EUHead, composite: str, output_dir: str, target_name: str = "embedded") -> None:
    model = _composite(composite, load_target(target_name))
    if PROXY_ENTROPY in head.feature_names:  # a proxy head joins the composite's head
        if model.eu_head is None:
            raise ValueError(f"The composite {composite!r} has no EU head to carry this proxy head; add one first.")
        model.eu_head.set_proxy_head(head)
    else:
        model.eu_head = head.attach(model.target)
    model.save_pretrained(output_dir)
    print(f"composite with the EU head saved in {output_dir}")


def main(argv=None) -> None:
    script, config = HfArgumentParser((EUHeadScriptArguments, EUHeadConfig)).parse_args_into_dataclasses(argv)
    if not 0 <= script.holdout_fraction < 1:
        raise ValueError(f"`holdout_fraction` must be in [0, 1), got {script.holdout_fraction}.")
    head = train_eu_head(script, config)
    if script.composite and script.composite_output_dir:
        _add_to_composite(head, script.composite, script.composite_output_dir, script.target)
    if config.push_to_hub:
        raise ValueError("Push the composite (`UncertaintyAwareModelForCausalLM.push_to_hub`), not the head alone.")


if __name__ == "__main__":
    main()
