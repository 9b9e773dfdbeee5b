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
    assert len(model.eu_head.info["data"]) == 6 and len(questions) == len(set(questions)) == 4  # 3 folders, 2 labels
    work = tmp_path / "work"
    for first in ("eu-head-data", "eu-head-data-2", "eu-head-data-3"):  # second labels: the same answers, 4 copies
        assert (work / f"{first}-varied4" / "answers.json").read_bytes() == (work / first / "answers.json").read_bytes()
        assert json.load(open(work / f"{first}-varied4" / "settings.json"))["num_perturbed"] == 4
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


@pytest.mark.parametrize("varied", [False, True])
def test_eu_head_folders_get_their_own_seed_ranges_when_seeds_vary_per_batch(tmp_path, varied):
    from trainers.eu_head_data import batch_seeds
    from trainers.train_defaults import DefaultsArguments, _eu_head_data_args

    args = DefaultsArguments(work_dir=str(tmp_path), eu_head_num_perturbed=4, eu_head_seeds_per_batch=varied,
                             eu_head_second_labels=0)
    folders = _eu_head_data_args(args, str(tmp_path / "eu-head-data"))
    assert len(folders) == 1 + len(args.eu_head_more_sets) and all(f.seeds_per_batch is varied for f in folders)
    assert all(f.num_perturbed == 4 for f in folders)
    seeds = [set(batch_seeds(f, number)) for f in folders for number in range(200)]  # 1,600 answers per folder
    if varied:  # no two batches of any two folders share a perturbation
        assert len(set().union(*seeds)) == sum(len(s) for s in seeds)
        assert [f.perturbation_seed_start for f in folders] == [20000 + 10000 * k for k in range(1, len(folders) + 1)]
    else:  # the shipped head's data: one set of seeds everywhere
        assert all(s == {20000, 20001, 20002, 20003} for s in seeds)


def test_second_labels_reuse_each_folders_answers_with_fresh_seeds(tmp_path):
    from trainers.eu_head_data import batch_seeds
    from trainers.train_defaults import DefaultsArguments, _eu_head_data_args

    args = DefaultsArguments(work_dir=str(tmp_path), eu_head_second_labels=4)
    folders = _eu_head_data_args(args, str(tmp_path / "eu-head-data"))
    first, second = folders[:len(folders) // 2], folders[len(folders) // 2:]
    assert len(first) == len(second) == 1 + len(args.eu_head_more_sets)
    for a, b in zip(first, second):
        assert b.answers_from == a.output_dir and b.output_dir == a.output_dir + "-varied4"
        assert (b.questions_per_task, b.question_seed, b.exclude_questions) == (a.questions_per_task, a.question_seed,
                                                                                a.exclude_questions)
        assert (a.num_perturbed, a.seeds_per_batch, b.num_perturbed, b.seeds_per_batch) == (16, False, 4, True)
    seeds = [set(batch_seeds(f, number)) for f in second for number in range(200)]
    assert len(set().union(*seeds)) == sum(len(s) for s in seeds)  # no perturbation used twice
    assert not set().union(*seeds) & set(batch_seeds(first[0], 0))  # nor one of the first labels' 20000-20015
    for bad in (dict(eu_head_second_labels=1), dict(eu_head_second_labels=4, eu_head_seeds_per_batch=True)):
        with pytest.raises(ValueError, match="eu_head_second_labels"):
            _eu_head_data_args(DefaultsArguments(work_dir=str(tmp_path), **bad), str(tmp_path / "d"))
