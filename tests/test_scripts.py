"""The training scripts from the command line: one process, and unchanged under `accelerate launch` x2."""

import os
import subprocess
import sys

import pytest

from trainers.run_ddd import main as run_ddd

from conftest import tiny_llama
from test_trainers import response_rows

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture()
def files(tmp_path):
    target_dir = str(tmp_path / "target")
    tiny_llama(seed=0).save_pretrained(target_dir)
    data_dir = str(tmp_path / "responses")
    response_rows(num_prompts=6, num_responses=2).save_to_disk(data_dir)
    return target_dir, data_dir


def test_run_ddd_trains_and_saves_a_lora_draft(tmp_path, files):
    target_dir, data_dir = files
    out = str(tmp_path / "draft_1")
    trainer = run_ddd(["--dataset_path", data_dir, "--target", target_dir, "--student_init", "target_layers:1",
                       "--output_dir", out, "--partition_index", "1", "--num_prompt_groups", "1",
                       "--num_response_slots", "2", "--max_steps", "2", "--per_device_train_batch_size", "2",
                       "--loss", "cross_entropy", "--lora_r", "2", "--report_to", "none", "--use_cpu", "True",
                       "--save_strategy", "no"])
    assert set(trainer.train_dataset["response_slot"]) == {1}
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


def test_run_osd_under_accelerate_launch_with_two_processes(tmp_path, files):
    target_dir, data_dir = files
    out = str(tmp_path / "proxy")
    # accelerate runs several CPU processes through torchrun (gloo) with --multi_gpu plus use_cpu
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "trainers.run_osd", "--dataset_path", data_dir, "--target", target_dir,
               "--student_init", "target_layers:1", "--output_dir", out, "--max_steps", "2",
               "--per_device_train_batch_size", "2", "--lora_r", "2", "--report_to", "none", "--save_strategy", "no",
               "--use_cpu", "True", "--log_level", "info"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    output = result.stdout + result.stderr
    assert "'train_loss'" in output
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in output, output[-2000:]
