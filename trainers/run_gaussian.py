"""Fit a Gaussian-distilled student (seed 002) and add it to a composite, from the command line.

Usage (teachers: 8 seeded low-rank perturbations of the target; student: the target itself + a factor head):

    python -m trainers.run_gaussian --dataset_path responses/ --output_dir gaussian \
        --composite hf_eu/defaults/smollm2-135m-instruct --composite_output_dir my-composite \
        --num_factors 4 --num_members 8 --max_steps 400 --m_step_steps 40

The design points are the response positions of the rows (as `trainers.data.generate_responses`
writes them); the teachers' hidden states there are cached in `<output_dir>/design_cache`, so an
interrupted run resumes without recomputing finished members (`--resume_from_checkpoint` resumes EM).
`--teachers drafts` uses the composite's drafts as the ensemble instead. The composite, with the
student attached, is written to `--composite_output_dir` (default `<output_dir>/composite`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_eu import UncertaintyAwareModelForCausalLM, truncated_copy
from hf_eu.defaults import DEFAULT_COMPOSITE_DIR
from hf_eu.gaussian import GaussianStudentForCausalLM
from .gaussian_config import GaussianDistillationConfig
from .gaussian_trainer import GaussianDistillationTrainer
from .script_utils import load_rows, load_target

TEACHERS = ("perturbation", "drafts")


@dataclass
class GaussianScriptArguments:
    """Arguments of `trainers.run_gaussian` besides the trainer config."""

    dataset_path: str = field(metadata={"help": "Response rows: a `save_to_disk` folder or a .jsonl file."})
    target: str = field(default="embedded", metadata={"help": "Target id or folder; 'embedded' = SmolLM2-135M."})
    composite: str | None = field(default=None, metadata={"help": "Saved composite the student joins (default: the "
                                                                  "shipped one when the target is 'embedded')."})
    composite_output_dir: str | None = field(default=None, metadata={"help": "Where the composite with the student "
                                                                             "is written (default <output_dir>/composite)."})
    backbone: str = field(default="target", metadata={"help": "'target' (the target itself: nothing stored) or "
                                                              "'target_layers:N' (a frozen copy of its first N layers)."})
    teachers: str = field(default="perturbation", metadata={"help": f"Teacher ensemble, one of {TEACHERS}."})
    head_intermediate_size: int = field(default=256, metadata={"help": "Width of the factor head's hidden layer."})
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows."})

    def __post_init__(self):
        if self.teachers not in TEACHERS:
            raise ValueError(f"`teachers` must be one of {TEACHERS}, got {self.teachers!r}.")
        if self.backbone != "target" and not self.backbone.startswith("target_layers:"):
            raise ValueError(f"`backbone` must be 'target' or 'target_layers:N', got {self.backbone!r}.")


def build_gaussian_student(target, backbone: str, num_factors: int, intermediate_size: int) -> GaussianStudentForCausalLM:
    """The student: the target itself, or a copy of its first N layers sharing its embedding and head."""
    if backbone != "target":
        backbone_model = truncated_copy(target, int(backbone.split(":", 1)[1]), share_embeddings=True)
    else:
        backbone_model = target
    return GaussianStudentForCausalLM(backbone_model, num_factors=num_factors, intermediate_size=intermediate_size)


def main(argv: list[str] | None = None) -> GaussianDistillationTrainer:
    parser = HfArgumentParser((GaussianScriptArguments, GaussianDistillationConfig))
    script_args, config = parser.parse_args_into_dataclasses(args=argv)
    composite_dir = script_args.composite or (DEFAULT_COMPOSITE_DIR if script_args.target == "embedded" else None)
    if composite_dir is None:
        raise ValueError("Pass `--composite` (a saved composite whose drafts the student joins); a composite needs "
                         "at least one draft.")

    # ------------------------------------------------------------------ models
    target = load_target(script_args.target)
    composite = UncertaintyAwareModelForCausalLM.from_pretrained(composite_dir, target=target)
    student = build_gaussian_student(target, script_args.backbone, config.num_factors,
                                     script_args.head_intermediate_size)
    ensemble = ({"teachers": list(composite.drafts)} if script_args.teachers == "drafts" else {"teacher": target})

    # ---------------------------------------------------------------- training
    rows = load_rows(script_args.dataset_path, script_args.max_rows)
    trainer = GaussianDistillationTrainer(model=student, args=config, train_dataset=rows, **ensemble)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)  # the head (and its fitted noise) alone

    # --------------------------------------------------------------- composite
    composite = UncertaintyAwareModelForCausalLM(target, list(composite.drafts), composite.proxy,
                                                 config=composite.config, calibrator=composite.calibrator,
                                                 student=student.eval())
    composite.save_pretrained(script_args.composite_output_dir or os.path.join(config.output_dir, "composite"))
    return trainer


if __name__ == "__main__":
    main()
