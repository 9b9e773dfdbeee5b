"""The `make train-defaults` pipeline end to end on the real SmolLM2, with tiny settings (about 40 s)."""

import json
import os

import pytest
import torch

from hf_eu import UncertaintyAwareModelForCausalLM
from hf_eu.embedded import load_embedded_target
from trainers.train_defaults import main as train_defaults


@pytest.mark.slow
def test_pipeline_ships_a_loadable_adapter_only_composite(tmp_path):
    out, idd = tmp_path / "defaults", tmp_path / "idd"
    argv = ["--work_dir", str(tmp_path / "work"), "--output_dir", str(out), "--idd_output_dir", str(idd),
            "--gsm_questions", "2", "--arith_questions_per_task", "1", "--max_new_tokens", "6",
            "--ddd_steps", "2", "--osd_steps", "1", "--batch_size", "4", "--lora_r", "2",
            "--eu_head_questions", "arith_add_mul=2", "--eu_head_more_sets", "2100:arith_chain_sum=1",
            "2200:arith_products=1",
            "--eu_head_num_perturbed", "2", "--eu_head_epochs", "1",
            "--eu_head_max_new_tokens", "6", "--eu_head_exclude", str(tmp_path / "none.json")]
    train_defaults(argv)
    first_log = json.load(open(out / "train_log.json"))
    train_defaults(argv)  # a rerun finds every stage finished: nothing is trained or sampled again
    assert json.load(open(out / "train_log.json"))["train_seconds"] == first_log["train_seconds"]
    files = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
    assert {"config.json", "README.md", "train_log.json", "train_settings.json", "train_questions.json",
            "drafts/draft_2/adapter_model.safetensors", "proxy/adapter_model.safetensors", "eu_head/model.safetensors",
            "eu_head/config.json", "eu_head_questions.json"} <= files
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    assert size < 2 * 2**20, "rank-2 adapters on 4 layers must stay tiny: no base weights are stored"
    log = json.load(open(out / "train_log.json"))
    assert log["data"]["responses"] == 5 * 3 and all(log[f"ddd_draft_{k}"]["steps"] == 2 for k in range(3))
    card = open(out / "README.md").read()
    assert "partition_scheme" in card and "3x1" in card and "osd_noise" in card

    target, tokenizer = load_embedded_target()
    model = UncertaintyAwareModelForCausalLM.from_pretrained(str(out), target=target)
    inputs = tokenizer("What is 2 + 2?", return_tensors="pt")
    result = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(result.sequences, target.generate(**inputs, max_new_tokens=4, do_sample=False))
    assert model.config.estimator == "eu_head" and model.eu_head.info["tokens"] > 0
    questions = json.load(open(out / "eu_head_questions.json"))  # three folders, none repeating an earlier question
    assert len(model.eu_head.info["data"]) == 3 and len(questions) == len(set(questions)) == 4
    assert torch.isfinite(result.epistemic_uncertainty).all() and (result.epistemic_uncertainty > 0).all()
    assert model.eu_head.proxy_head is not None and model.eu_head.proxy_head.info["tokens"] == model.eu_head.info["tokens"]
    with_proxy = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                estimator="eu_head_proxy")
    assert torch.isfinite(with_proxy.epistemic_uncertainty).all() and (with_proxy.epistemic_uncertainty > 0).all()
    drafts_eu = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, estimator="hf_eu")
    assert (drafts_eu.eu_variance > 0).any()


def test_more_eu_head_sets_need_a_seed():
    from trainers.train_defaults import _seeded_set

    assert _seeded_set("2200:gsm_symbolic=120") == (2200, "gsm_symbolic=120")
    for bad in ("gsm_symbolic=120", "x:gsm_symbolic=1", "2200:"):
        with pytest.raises(ValueError, match="SEED:preset=count"):
            _seeded_set(bad)
