"""DDD resumed from a checkpoint ends where an uninterrupted run ends (weights, step, shuffled partition order)."""

import torch
from transformers import TrainerCallback

from hf_eu import truncated_copy
from trainers.ddd_config import DDDConfig
from trainers.ddd_trainer import DDDTrainer
from trainers.partition import partition_dataset

from test_trainers import COMMON, response_rows, snapshot


class StopAfterTwoSteps(TrainerCallback):
    """The "interruption": training ends right after checkpoint-2 is written."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            control.should_training_stop = True


def test_ddd_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, target):
    data = partition_dataset(response_rows(num_prompts=8, teacher=target, top_k=8), num_prompt_groups=1,
                             num_response_slots=3, seed=0)

    def run(output_dir, callbacks=(), resume=None):
        torch.manual_seed(0)
        draft = truncated_copy(target, 1)
        args = DDDConfig(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                         loss="forward_kl", partition_index=1, num_prompt_groups=1, num_response_slots=3,
                         **{**COMMON, "save_strategy": "steps"}, save_steps=2)
        DDDTrainer(model=draft, args=args, train_dataset=data, callbacks=list(callbacks)).train(
            resume_from_checkpoint=resume)
        return snapshot(draft)

    uninterrupted = run(tmp_path / "a")
    interrupted = run(tmp_path / "b", callbacks=[StopAfterTwoSteps()])
    assert (tmp_path / "b" / "checkpoint-2").is_dir()
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"))
    assert any(not torch.equal(interrupted[n], uninterrupted[n]) for n in uninterrupted)  # the stop was real
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name])
