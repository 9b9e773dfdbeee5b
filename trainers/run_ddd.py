"""Train one Data-Diverse Draft (draft k on partition k) from the command line.

Usage (one process, or unchanged under `accelerate launch --num_processes 2 ...`):

    python -m trainers.run_ddd --dataset_path responses/ --output_dir drafts/draft_0 \
        --partition_index 0 --num_prompt_groups 1 --num_response_slots 3 --max_steps 100

The data set holds the target's sampled responses (trainers.data.generate_responses); it is split
G×S with `partition_seed`, so every process and every resumed run sees the same partitions.
Resume an interrupted run with `--resume_from_checkpoint drafts/draft_0/checkpoint-50`.
"""

from __future__ import annotations

from transformers import HfArgumentParser

from .ddd_config import DDDConfig
from .ddd_trainer import DDDTrainer
from .partition import partition_dataset
from .script_utils import ScriptArguments, build_student, load_rows, load_target, train_and_save


def main(argv: list[str] | None = None) -> DDDTrainer:
    parser = HfArgumentParser((ScriptArguments, DDDConfig))
    script_args, config = parser.parse_args_into_dataclasses(args=argv)

    # ------------------------------------------------------------------ data
    rows = load_rows(script_args.dataset_path, script_args.max_rows)
    data = partition_dataset(rows, config.num_prompt_groups, config.num_response_slots, seed=config.partition_seed)

    # ---------------------------------------------------------------- models
    target = load_target(script_args.target)
    draft = build_student(script_args, target)
    live_teacher = target if config.loss == "forward_kl" and "teacher_topk_ids" not in rows.column_names else None

    # -------------------------------------------------------------- training
    trainer = DDDTrainer(model=draft, args=config, train_dataset=data, teacher=live_teacher)
    train_and_save(trainer, config)
    return trainer


if __name__ == "__main__":
    main()
