"""The EU head's training data: per-batch perturbation seeds, label scale across copy counts, settings checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import PAD_ID
from hf_eu.divergences import jsd
from hf_eu.estimators import perturbed_ensemble_estimator
from hf_eu.perturbation import LowRankGaussianPerturbation
from hf_eu.scoring import score_tokens_many
from trainers.eu_head_data import (EUHeadDataArguments, _check_settings, _ground_truth, batch_seeds, copies_scale,
                                   load_data)


def _args(tmp_path, **kwargs) -> EUHeadDataArguments:
    return EUHeadDataArguments(output_dir=str(tmp_path / "data"), num_perturbed=4, perturbation_seed_start=20000,
                               **kwargs)


def test_batch_seeds_are_one_set_or_disjoint_blocks(tmp_path):
    fixed = _args(tmp_path)
    assert batch_seeds(fixed, 0) == batch_seeds(fixed, 7) == [20000, 20001, 20002, 20003]
    varied = _args(tmp_path, seeds_per_batch=True)
    blocks = [batch_seeds(varied, number) for number in range(6)]
    assert blocks[0] == [20000, 20001, 20002, 20003] and blocks[2] == [20008, 20009, 20010, 20011]
    assert len({seed for block in blocks for seed in block}) == 6 * 4  # no seed shared by two batches
    assert min(min(block) for block in blocks) >= 20000  # never the evaluation's 0-15 nor TokUR's 10000+


def _rows(n=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(3, 64, (4,), generator=generator).tolist(),
             "answer_ids": torch.randint(3, 64, (5 + k,), generator=generator).tolist()} for k in range(n)]


def test_each_batch_gets_its_own_perturbations(target, tmp_path):
    rows = _rows()
    perturbation = LowRankGaussianPerturbation(target, rank=2, sigma=0.3)
    args = _args(tmp_path, seeds_per_batch=True)
    values = _ground_truth(args, target, rows, PAD_ID, perturbation, number=2)
    ids = torch.full((3, 11), PAD_ID)
    mask = torch.zeros(3, 11, dtype=torch.long)
    answer_mask = torch.zeros(3, 7, dtype=torch.bool)
    for row, r in enumerate(rows):  # the same right-padded batch, built by hand, scored with batch 2's seeds
        ids[row, :4 + len(r["answer_ids"])] = torch.tensor(r["prompt_ids"] + r["answer_ids"])
        mask[row, :4 + len(r["answer_ids"])] = 1
        answer_mask[row, :len(r["answer_ids"])] = True
    expected = score_tokens_many([perturbed_ensemble_estimator(4, "ground_truth")], ids, 4, drafts=[], proxy=None,
                                 target=target, attention_mask=mask, uncertainty_mask=answer_mask,
                                 perturbation=perturbation, perturbation_seeds=[20008, 20009, 20010, 20011])
    expected = expected["ground_truth"].epistemic_uncertainty[answer_mask].double().numpy()
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-7)
    fixed = _ground_truth(_args(tmp_path), target, rows, PAD_ID, perturbation, number=2)  # seeds 20000-20003
    assert np.abs(fixed - values).max() > 1e-4


def test_copies_scale_matches_the_expected_mutual_information_of_m_members():
    """Brute force in float64: the mean JSD of M small Gaussian logit perturbations grows like (1 - 1/M)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=generator, dtype=torch.float64) * 2  # (N, V)
    scale = torch.rand(6, 10, generator=generator, dtype=torch.float64) * 0.02  # per-logit size of the change

    def mean_jsd(members: int, draws: int = 3000) -> torch.Tensor:
        noise = torch.randn(draws, members, 6, 10, generator=generator, dtype=torch.float64) * scale
        logps = torch.log_softmax(logits + noise, -1)  # (draws, M, N, V)
        return jsd(logps, dim=1).mean(0)  # (draws, N) -> (N,)

    reference = mean_jsd(16)
    for members in (2, 4):
        ratio = reference / mean_jsd(members)
        np.testing.assert_allclose(ratio.numpy(), copies_scale(members, 16), rtol=0.06)
    assert copies_scale(16, 16) == 1.0 and copies_scale(4, 16) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="≥ 2 copies"):
        copies_scale(1, 16)


def _folder(tmp_path, num_perturbed: int):
    folder = tmp_path / f"m{num_perturbed}"
    folder.mkdir()
    rows = [{"prompt_ids": [3, 4], "answer_ids": [5, 6, 7]}, {"prompt_ids": [3], "answer_ids": [8, 9]}]
    json.dump(rows, open(folder / "answers.json", "w"))
    json.dump({"batch_size": 8, "num_perturbed": num_perturbed, "target_fingerprint": "x"},
              open(folder / "settings.json", "w"))
    truth = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    np.savez(folder / "ground_truth-00000.npz", ground_truth=truth)
    np.savez(folder / "features-00000.npz", values=np.zeros((5, 3), np.float32), topk_ids=np.zeros((5, 2), np.int32),
             topk_logps=np.zeros((5, 2), np.float32))
    return str(folder), truth


def test_load_data_puts_labels_on_the_scale_of_sixteen_copies(tmp_path):
    folder, truth = _folder(tmp_path, 4)
    np.testing.assert_allclose(load_data(folder)["ground_truth"], truth * (1 - 1 / 16) / (1 - 1 / 4))
    np.testing.assert_array_equal(load_data(folder, ground_truth_copies=None)["ground_truth"], truth)
    sixteen, truth16 = _folder(tmp_path, 16)
    np.testing.assert_array_equal(load_data(sixteen)["ground_truth"], truth16)  # the shipped data: unchanged
    np.testing.assert_array_equal(load_data(folder)["answer_index"], [0, 0, 0, 1, 1])


def test_data_made_before_seeds_per_batch_existed_still_resumes(tmp_path):
    args = _args(tmp_path)
    _check_settings(args, "fingerprint")
    path = tmp_path / "data" / "settings.json"
    stored = json.load(open(path))
    assert stored["seeds_per_batch"] is False
    del stored["seeds_per_batch"]  # as the shipped head's folders were written
    json.dump(stored, open(path, "w"))
    _check_settings(args, "fingerprint")  # accepted: it was made with the default
    with pytest.raises(ValueError, match="seeds_per_batch"):
        _check_settings(_args(tmp_path, seeds_per_batch=True), "fingerprint")
    assert "seeds_per_batch" not in json.load(open(path))  # nothing written by the refused run


def test_a_second_label_set_reuses_the_answers_and_features_and_nothing_else(tmp_path):
    from trainers.eu_head_data import _reuse_answers

    source = _args(tmp_path)
    _check_settings(source, "fingerprint")
    folder = tmp_path / "data"
    json.dump([{"question": "q"}], open(folder / "questions.json", "w"))
    json.dump([{"prompt_ids": [3], "answer_ids": [4, 5]}], open(folder / "answers.json", "w"))
    np.savez(folder / "features-00000.npz", values=np.ones((2, 3)))
    np.savez(folder / "ground_truth-00000.npz", ground_truth=np.ones(2))
    second = EUHeadDataArguments(output_dir=str(tmp_path / "second"), num_perturbed=8, seeds_per_batch=True,
                                 perturbation_seed_start=30000, answers_from=str(folder))
    _check_settings(second, "fingerprint")
    (tmp_path / "second" / "questions.json").write_text("mine")  # a file already there is never replaced
    _reuse_answers(second)
    copied = sorted(p.name for p in (tmp_path / "second").iterdir())
    assert copied == ["answers.json", "features-00000.npz", "questions.json", "settings.json"]  # no ground truth
    assert (tmp_path / "second" / "answers.json").read_bytes() == (folder / "answers.json").read_bytes()
    assert (tmp_path / "second" / "features-00000.npz").read_bytes() == (folder / "features-00000.npz").read_bytes()
    assert (tmp_path / "second" / "questions.json").read_text() == "mine"
    assert json.load(open(tmp_path / "second" / "settings.json"))["num_perturbed"] == 8  # answers_from not recorded
    assert "answers_from" not in json.load(open(tmp_path / "second" / "settings.json"))
    other = EUHeadDataArguments(output_dir=str(tmp_path / "other"), question_seed=3000, answers_from=str(folder))
    _check_settings(other, "fingerprint")
    with pytest.raises(ValueError, match="question_seed"):
        _reuse_answers(other)
    with pytest.raises(ValueError, match="no settings.json"):
        _reuse_answers(EUHeadDataArguments(output_dir=str(tmp_path / "other"), answers_from=str(tmp_path / "none")))


def test_the_proxy_heads_command_reads_the_proxy_in_the_dtype_asked(eu_model, target, tmp_path):
    from trainers.run_eu_head import _composite

    eu_model.save_pretrained(tmp_path / "composite")
    stored = _composite(str(tmp_path / "composite"), target).proxy
    cast = _composite(str(tmp_path / "composite"), target, proxy_dtype="bfloat16").proxy
    assert {p.dtype for p in stored.parameters()} == {torch.float32}
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in target.parameters()} == {torch.float32}  # the target is never cast
    for (name, original), kept, halved in zip(eu_model.proxy.named_parameters(), stored.parameters(), cast.parameters()):
        assert torch.equal(kept, original), name  # the saved proxy, unchanged
        assert torch.equal(halved, original.to(torch.bfloat16)), name  # and exactly its bfloat16 rounding
