"""Train the OSD proxy (forward KL to a freshly perturbed target) from the command line.

Usage (one process, or unchanged under `accelerate launch --num_processes 2 ...`):

    python -m trainers.run_osd --dataset_path responses/ --output_dir proxy \
        --perturbation_rank 8 --perturbation_sigma 0.1 --max_steps 150

Resume an interrupted run with `--resume_from_checkpoint proxy/checkpoint-50`: the perturbations
are a function of the seed and the step, so the resumed run draws the same noise.
"""

from __future__ import annotations

from transformers import HfArgumentParser

from .osd_config import OSDConfig
from .osd_trainer import OSDTrainer
from .script_utils import ScriptArguments, build_student, load_rows, load_target, train_and_save


def main(argv: list[str] | None = None) -> OSDTrainer:
    parser = HfArgumentParser((ScriptArguments, OSDConfig))
    script_args, config = parser.parse_args_into_dataclasses(args=argv)

    rows = load_rows(script_args.dataset_path, script_args.max_rows)
    target = load_target(script_args.target)
    proxy = build_student(script_args, target)

    trainer = OSDTrainer(model=proxy, args=config, train_dataset=rows, teacher=target)
    train_and_save(trainer, config)
    return trainer


if __name__ == "__main__":
    main()
