"""The evaluation benchmark: metric modules against brute force, detection and detectors on synthetic data,
and the `tiny` scale end to end (results keys, plots, resuming from the cache)."""

import json
import os
import types

import evaluate
import numpy as np
import pytest

from benchmarks.eval_metrics import detection, detector_auroc, estimation_error, prediction_rejection_ratio

METRICS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "metrics")


def brute_prr(uncertainty, quality):
    """Rejection curves by explicit loops over every rejection count."""
    n = len(quality)

    def area(order):
        return np.mean([np.mean([quality[i] for i in order[: n - k]]) for k in range(n)])

    by_uncertainty = sorted(range(n), key=lambda i: (uncertainty[i], i))
    by_quality = sorted(range(n), key=lambda i: (-quality[i], i))
    random = np.mean(quality)
    return (area(by_uncertainty) - random) / (area(by_quality) - random)


def test_prr_matches_brute_force_and_its_bounds():
    rng = np.random.default_rng(0)
    for _ in range(5):
        quality = rng.integers(0, 2, 30).astype(float)
        uncertainty = rng.normal(size=30) - quality  # informative but noisy
        assert prediction_rejection_ratio(uncertainty, quality) == pytest.approx(brute_prr(uncertainty, quality))
    quality = np.array([1, 0, 1, 0, 1.0])
    assert prediction_rejection_ratio(1 - quality, quality) == pytest.approx(1.0)  # oracle ordering
    assert prediction_rejection_ratio(quality, quality) < 0  # rejecting right answers first
    assert np.isnan(prediction_rejection_ratio([0.1, 0.2], [1.0, 1.0]))


def test_metric_modules_load_from_a_local_path():
    prr = evaluate.load(os.path.join(METRICS, "prr"))
    assert prr.compute(predictions=[0.9, 0.1, 0.5, 0.2], references=[0, 1, 0, 1])["prr"] == pytest.approx(1.0)
    rmse = evaluate.load(os.path.join(METRICS, "eu_rmse"))
    predictions, references = [0.1, 0.4, 0.2], [0.0, 0.5, 0.1]
    expected = np.sqrt(np.mean((np.array(predictions) - np.array(references)) ** 2))
    assert rmse.compute(predictions=predictions, references=references)["rmse"] == pytest.approx(expected)


def test_affine_rmse_uses_only_the_fit_tokens():
    truth = np.array([0.0, 0.1, 0.2, 0.3])
    fit = (np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.1, 0.2]))  # truth = 0.1 x - 0.1 on the calibration tokens
    result = estimation_error(10 * truth + 1, truth, fit)
    assert result["rmse"] == pytest.approx(0.0, abs=1e-12)
    assert result["affine"] == pytest.approx([0.1, -0.1])
    assert estimation_error(10 * truth + 1, truth)["rmse"] > 1  # without the map: another scale


def test_detection_and_detector_see_what_a_feature_adds():
    rng = np.random.default_rng(1)
    wrong = rng.integers(0, 2, 200)
    informative = wrong + rng.normal(scale=0.7, size=200)
    noise = rng.normal(size=200)
    result = detection(wrong, informative, bootstrap=200)
    assert 0.75 < result["auroc"] < 1.0
    low, high = result["auroc_ci"]
    assert low <= result["auroc"] <= high
    assert detection(wrong, -informative, bootstrap=0)["auroc"] == pytest.approx(1 - result["auroc"])
    without = detector_auroc(noise[:, None], wrong, seeds=2)
    with_it = detector_auroc(np.stack([noise, informative], 1), wrong, seeds=2)
    assert with_it["auroc_mean"] > without["auroc_mean"] + 0.2
    assert detection(np.zeros(5), np.arange(5.0), bootstrap=10)["auroc"] is None  # one class: undefined


@pytest.mark.slow
def test_tiny_scale_end_to_end_and_resume(tmp_path, monkeypatch):
    from benchmarks import eval_scoring, run

    out, cache = tmp_path / "results", tmp_path / "cache"
    results = run.run(["--scale", "tiny", "--out", str(out), "--cache", str(cache)])
    stored = json.load(open(out / "results.json"))
    assert stored["n_questions"] == results["n_questions"] and {"arith", "gsm", "calib"} <= set(stored["n_questions"])
    names = {r["name"] for r in stored["estimators"]}
    assert {"hf_eu", "hf_eu_variance_only", "hf_eu_no_osd", "hf_eu_idd", "hf_eu_k2", "tokur_m4", "tokur_m8", "entropy",
            "max_prob", "neg_logprob", "hf_eu_calibrated"} <= names
    for record in stored["estimators"]:
        assert {"name", "set", "rmse", "pearson", "spearman", "auroc", "auprc", "prr", "flops_ratio",
                "time_ratio"} <= set(record)
        assert record["rmse"] is not None and record["rmse"] >= 0
    truth = [r for r in stored["estimators"] if r["name"] == "ground_truth"]
    assert all(r["rmse"] == 0 for r in truth)
    tokur = {r["set"]: r for r in stored["estimators"] if r["name"] == "tokur_m8"}
    assert all(r["flops_ratio"] == 8 for r in tokur.values())
    assert {(d["set"], d["features"]) for d in stored["detectors"]} == {
        (s, f) for s in ("arith", "gsm") for f in ("confidence", "confidence+hf_eu")}
    for name in ("results.md", "roc.png", "eu_vs_ground_truth.png", "answer_heatmap.png", "answer_heatmap.html"):
        assert (out / name).stat().st_size > 0
    assert {"command", "machine", "target_accuracy"} <= set(stored)
    from benchmarks.eval_setup import ARITH_TASKS

    weighting = stored["answer_risk"]["arith"]["weighting"]  # the detector was fitted with detect_weights
    assert set(weighting) <= set(ARITH_TASKS) and all(w["kept"] > 0 for w in weighting.values())

    def no_scoring(*args, **kwargs):
        raise AssertionError("a finished stage was recomputed")

    monkeypatch.setattr(eval_scoring, "score_tokens_many", no_scoring)
    monkeypatch.setattr(eval_scoring, "answer_greedily", no_scoring)
    os.remove(out / "results.json")
    again = run.run(["--scale", "tiny", "--out", str(out), "--cache", str(cache)])
    key = lambda r: (r["name"], r["set"])  # noqa: E731
    before = {key(r): r["rmse"] for r in results["estimators"]}
    assert {key(r): r["rmse"] for r in again["estimators"]} == before


def test_a_larger_arith_count_extends_the_question_list(monkeypatch):
    from benchmarks import eval_setup

    monkeypatch.setattr(eval_setup, "ARITH_ROUND", 2)
    smaller = eval_setup.Scale("s", questions={"arith": 6, "gsm": 2}, max_new_tokens={})
    larger = eval_setup.Scale("l", questions={"arith": 12, "gsm": 5}, max_new_tokens={})
    first, second = eval_setup.build_questions(smaller, set()), eval_setup.build_questions(larger, set())
    for name in ("arith", "gsm"):
        texts = [q["question"] for q in second[name]]
        assert [q["question"] for q in first[name]] == texts[:len(first[name])] and len(set(texts)) == len(texts)
    assert [q["task"] for q in second["arith"]] == [t for t in eval_setup.ARITH_TASKS for _ in range(2)] * 2


def test_a_grown_set_keeps_cached_answers_and_rescores_only_changed_batches(tmp_path, monkeypatch):
    import torch

    from benchmarks import eval_scoring
    from benchmarks.eval_setup import Scale

    def fake_answers(target, tokenizer, questions, **kwargs):
        fake_answers.asked += list(questions)
        return [dict(text=f"= {len(q)}", prompt_ids=torch.tensor([1, 2]), answer_ids=torch.tensor([3] * (1 + len(q) % 3)),
                     seconds=0.1) for q in questions]

    def fake_scores(models, names, batch, scale, perturbation):
        fake_scores.batches.append([a["question"] for a in batch])
        total = sum(len(a["answer_ids"]) for a in batch)
        return {name: np.full(total, float(len(fake_scores.batches))) for name in names + ["ground_truth"]}

    fake_answers.asked, fake_scores.batches = [], []
    monkeypatch.setattr(eval_scoring, "answer_greedily", fake_answers)
    monkeypatch.setattr(eval_scoring, "_score_batch", fake_scores)
    monkeypatch.setattr(eval_scoring, "LowRankGaussianPerturbation", lambda *a, **k: None)
    scale = Scale("t", questions={}, max_new_tokens={"arith": 4}, batch_size=2)
    questions = [{"question": f"q{i}" + "x" * i, "answer": "1"} for i in range(5)]
    models = types.SimpleNamespace(target=None, tokenizer=None)
    answers = eval_scoring.collect_answers(models, questions[:3], scale, "arith", str(tmp_path))
    first = eval_scoring.collect_scores(models, answers, scale, str(tmp_path), ["entropy"])
    assert fake_scores.batches == [["q0", "q1x"], ["q2xx"]]
    answers = eval_scoring.collect_answers(models, questions, scale, "arith", str(tmp_path))
    assert fake_answers.asked == ["q0", "q1x", "q2xx", "q3xxx", "q4xxxx"]  # only the new questions were answered
    second = eval_scoring.collect_scores(models, answers, scale, str(tmp_path), ["entropy"])
    assert fake_scores.batches[2:] == [["q2xx", "q3xxx"], ["q4xxxx"]]  # the half batch grew: scored again
    assert [v.tolist() for v in second["entropy"][:2]] == [v.tolist() for v in first["entropy"][:2]]
    assert len(second["entropy"]) == 5 and all(len(v) == len(a["answer_ids"]) for v, a in zip(second["entropy"], answers))
    eval_scoring.collect_scores(models, answers, scale, str(tmp_path), ["entropy"])
    assert len(fake_scores.batches) == 4  # everything cached now
    for path in tmp_path.glob("scores-0000[02].npz"):
        path.unlink()
    from_end = eval_scoring.collect_scores(models, answers, scale, str(tmp_path), ["entropy"], from_end=True)
    assert fake_scores.batches[4:] == [["q4xxxx"], ["q0", "q1x"]]  # last batch first
    assert len(from_end["entropy"]) == 5 and [len(v) for v in from_end["entropy"]] == [len(a["answer_ids"]) for a in answers]


def test_rescore_drops_only_the_named_estimators_and_keeps_the_ground_truth(tmp_path, monkeypatch):
    import torch

    from benchmarks import eval_scoring
    from benchmarks.eval_setup import Scale

    calls = []

    def fake_scores(models, names, batch, scale, perturbation):
        calls.append(sorted(names))
        total = sum(len(a["answer_ids"]) for a in batch)
        return {name: np.full(total, float(len(calls))) for name in names}

    monkeypatch.setattr(eval_scoring, "_score_batch", fake_scores)
    monkeypatch.setattr(eval_scoring, "LowRankGaussianPerturbation", lambda *a, **k: None)
    scale = Scale("t", questions={}, max_new_tokens={"arith": 4}, batch_size=2)
    folder = tmp_path / "cache" / "arith"
    folder.mkdir(parents=True)
    answers = [dict(question=f"q{i}", prompt_ids=torch.tensor([1]), answer_ids=torch.tensor([3] * (i + 1))) for i in range(3)]
    names = ["entropy", "hf_eu"]
    models = types.SimpleNamespace(target=None)
    first = eval_scoring.collect_scores(models, answers, scale, str(folder), names)
    assert calls == [["entropy", "ground_truth", "hf_eu"]] * 2
    (folder / "timing.json").write_text(json.dumps({"generation": 1.0, "entropy": 0.5, "hf_eu": 0.7}))
    (folder / "notes.txt").write_text("mine")
    changed = eval_scoring.forget_estimators(str(tmp_path / "cache"), ["hf_eu"])
    assert changed == {"arith": 3}  # two scores files and the timing
    assert json.loads((folder / "timing.json").read_text()) == {"generation": 1.0, "entropy": 0.5}
    again = eval_scoring.collect_scores(models, answers, scale, str(folder), names)
    assert calls[2:] == [["hf_eu"]] * 2  # only the dropped estimator is scored again
    for name in ("entropy", "ground_truth"):
        assert [v.tolist() for v in again[name]] == [v.tolist() for v in first[name]]
    assert [v.tolist() for v in again["hf_eu"]] != [v.tolist() for v in first["hf_eu"]]
    eval_scoring.forget_estimators(str(tmp_path / "cache"), ["timing"])
    assert json.loads((folder / "timing.json").read_text()) == {}
    assert (folder / "notes.txt").read_text() == "mine"
    for bad in (["ground_truth"], ["hf_eu_typo"]):
        with pytest.raises(ValueError, match="--rescore"):
            eval_scoring.forget_estimators(str(tmp_path / "cache"), bad)
