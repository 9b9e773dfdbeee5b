"""The answer-risk detector: features against loops, probabilities against scikit-learn, the composite round trip,
absence without a detector, and abstention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from hf_eu.answer_risk import ANSWER_FEATURES, AnswerRiskDetector, answer_features
from trainers.answer_risk import CONFIDENCE_FEATURES, fit_answer_risk

torch.set_num_threads(1)


def test_answer_features_match_loops():
    generator = torch.Generator().manual_seed(0)
    eu, logps = torch.rand(3, 6, generator=generator), -torch.rand(3, 6, generator=generator) * 3
    entropy, maxp = torch.rand(3, 6, generator=generator) * 2, torch.rand(3, 6, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    got = answer_features(eu, logps, entropy, maxp, mask)
    for row in range(3):
        n = int(mask[row].sum())
        e, lp, h, m = (x[row, :n].double().tolist() for x in (eu, logps, entropy, maxp))
        ordered = sorted(e)
        position = 0.9 * (n - 1)  # torch.quantile's linear interpolation
        q90 = ordered[int(math.floor(position))] + (position - math.floor(position)) * (
            ordered[min(int(math.floor(position)) + 1, n - 1)] - ordered[int(math.floor(position))])
        expected = [sum(e), sum(e) / n, max(e), q90, sum(lp), sum(lp) / n, min(lp), sum(h) / n, max(h), sum(m) / n,
                    min(m), math.log(n)]
        assert_close(got[row], torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="at least one token"):
        answer_features(eu, logps, entropy, maxp, torch.zeros(3, 6, dtype=torch.bool))


def _synthetic(n=200, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, len(ANSWER_FEATURES)))
    wrong = (features[:, 1] - 0.5 * features[:, 5] + rng.normal(scale=0.5, size=n) > 0).astype(float)
    return features, wrong


def test_detector_probabilities_equal_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    features, wrong = _synthetic()
    detector = fit_answer_risk(features, wrong, estimator="eu_head")
    standardized = (features - features.mean(0)) / features.std(0)
    reference = LogisticRegression(C=1.0, max_iter=1000).fit(standardized, wrong).predict_proba(standardized)[:, 1]
    got = detector(torch.tensor(features)).double().numpy()
    np.testing.assert_allclose(got, reference, atol=1e-6)
    confidence = fit_answer_risk(features, wrong, estimator="eu_head", feature_names=CONFIDENCE_FEATURES)
    assert confidence.feature_names == CONFIDENCE_FEATURES and not any(n.startswith("eu_") for n in CONFIDENCE_FEATURES)
    with pytest.raises(ValueError, match="both kinds"):
        fit_answer_risk(features, np.zeros(len(features)), estimator="eu_head")


def test_weighted_fit_equals_scikit_learn_and_repeating_rows():
    from sklearn.linear_model import LogisticRegression

    features, wrong = _synthetic(n=120, seed=3)
    counts = np.random.default_rng(4).integers(1, 4, size=len(wrong)).astype(float)  # integer weights
    detector = fit_answer_risk(features, wrong, estimator="eu_head", sample_weight=counts)
    mean = (features * counts[:, None]).sum(0) / counts.sum()  # float64 weighted standardization, by hand
    std = np.sqrt((((features - mean) ** 2) * counts[:, None]).sum(0) / counts.sum())
    reference = LogisticRegression(C=1.0, max_iter=1000).fit(
        (features - mean) / std, wrong, sample_weight=counts / counts.mean()).predict_proba((features - mean) / std)[:, 1]
    np.testing.assert_allclose(detector(torch.tensor(features)).double().numpy(), reference, atol=1e-6)
    # weight k means "this answer k times": the same detector as the repeated rows, up to the regularization's scale
    repeated = fit_answer_risk(np.repeat(features, counts.astype(int), 0), np.repeat(wrong, counts.astype(int)),
                               estimator="eu_head", regularization=1 / counts.mean())
    np.testing.assert_allclose(detector(torch.tensor(features)).double().numpy(),
                               repeated(torch.tensor(features)).double().numpy(), atol=1e-4)
    assert detector.info["weighted"] and not repeated.info["weighted"]
    assert detector.info["wrong_fraction"] == round(float((wrong * counts).sum() / counts.sum()), 4)
    for bad in (np.ones(3), -counts, np.zeros(len(wrong)), np.full(len(wrong), np.nan)):
        with pytest.raises(ValueError, match="sample_weight"):
            fit_answer_risk(features, wrong, estimator="eu_head", sample_weight=bad)


def test_detector_round_trips(tmp_path):
    features, wrong = _synthetic()
    detector = fit_answer_risk(features, wrong, estimator="eu_head", info={"fitted_on": "synthetic"})
    detector.save(tmp_path / "detector")
    loaded = AnswerRiskDetector.load(tmp_path / "detector")
    assert loaded.estimator == "eu_head" and loaded.info["fitted_on"] == "synthetic"
    assert_close(loaded(torch.tensor(features)), detector(torch.tensor(features)))
    with pytest.raises(ValueError, match="Unknown answer features"):
        AnswerRiskDetector(["nonsense"], [0.0], [1.0], [1.0], 0.0, estimator="eu_head")


def test_abstain_exactly_where_the_risk_crosses():
    from hf_eu.answer_risk import ABSTAIN_MESSAGE, abstain

    risks = torch.tensor([0.1, 0.5, 0.51, 0.9])
    assert abstain(["a", "b", "c", "d"], risks, 0.5) == ["a", "b", ABSTAIN_MESSAGE, ABSTAIN_MESSAGE]
    assert abstain(["a", "b"], torch.tensor([0.2, 0.3]), 1.0) == ["a", "b"]
    with pytest.raises(ValueError, match="no fitted detector"):
        abstain(["a"], None, 0.5)
    with pytest.raises(ValueError, match="threshold"):
        abstain(["a"], torch.tensor([0.2]), 1.5)


@pytest.fixture()
def risky_model(target, drafts, proxy):
    from test_eu_head import _head

    from hf_eu import UncertaintyAwareModelForCausalLM

    features, wrong = _synthetic()
    detector = fit_answer_risk(features, wrong, estimator="eu_head")
    return UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, proxy=proxy, estimator="eu_head",
                                                            eu_head=_head(target)), detector


def test_generate_returns_the_detectors_risk(risky_model, batch, tmp_path):
    from hf_eu import UncertaintyAwareModelForCausalLM
    from hf_eu.eu_features import teacher_forced_features, token_confidence

    model, detector = risky_model
    no_risk = model.generate(**batch, max_new_tokens=5, return_dict_in_generate=True)
    assert no_risk.answer_risk is None and "answer_risk" not in no_risk.keys()  # absent, not zeros
    model.detector = detector
    out = model.generate(**batch, max_new_tokens=5, return_dict_in_generate=True)
    width = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, width:])], 1)
    features = teacher_forced_features(model.target, out.sequences, width, attention_mask=mask)
    token_logps, entropy, max_probs = token_confidence(features, out.sequences[:, width:])
    expected = detector(answer_features(out.epistemic_uncertainty, token_logps, entropy, max_probs, out.uncertainty_mask))
    assert out.answer_risk.shape == (2,) and ((0 <= out.answer_risk) & (out.answer_risk <= 1)).all()
    assert_close(out.answer_risk, expected, atol=1e-5, rtol=1e-4)
    answer_mask = torch.cat([batch["attention_mask"], out.uncertainty_mask.long()], 1)  # padding after EOS: 0
    again = model.estimate_uncertainty(out.sequences, answer_mask, prompt_length=width)
    assert_close(again.answer_risk, expected, atol=1e-5, rtol=1e-4)
    assert model.generate(**batch, max_new_tokens=5, return_dict_in_generate=True, estimator="hf_eu").answer_risk is None
    model.save_pretrained(tmp_path / "composite")
    loaded = UncertaintyAwareModelForCausalLM.from_pretrained(tmp_path / "composite", target=model.target)
    assert loaded.config.has_detector and loaded.detector.estimator == "eu_head"
    assert_close(loaded.generate(**batch, max_new_tokens=5, return_dict_in_generate=True).answer_risk, out.answer_risk)


def test_beam_search_scores_and_risks_from_one_target_pass(risky_model, batch):
    """Beam search (and assisted decoding) cannot use the recorded passes: one teacher-forced pass of the target
    serves both the EU head and the detector (it used to run twice), with the same values as the reference."""
    from hf_eu.eu_features import teacher_forced_features, token_confidence

    model, detector = risky_model
    model.detector = detector
    calls = []
    handle = model.target.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        model.target.generate(**batch, max_new_tokens=4, num_beams=2)
        decoding = len(calls)
        out = model.generate(**batch, max_new_tokens=4, num_beams=2, return_dict_in_generate=True)
    finally:
        handle.remove()
    width = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, width:])], 1)
    assert len(calls) - 2 * decoding == 2  # the prompt's prefill and one chunk over the 4 answer tokens
    features = teacher_forced_features(model.target, out.sequences, width, attention_mask=mask)
    token_logps, entropy, max_probs = token_confidence(features, out.sequences[:, width:])
    expected = detector(answer_features(out.epistemic_uncertainty, token_logps, entropy, max_probs, out.uncertainty_mask))
    assert_close(out.answer_risk, expected, atol=1e-5, rtol=1e-4)
    reference = model.estimate_uncertainty(out.sequences, mask, prompt_length=width)
    assert_close(out.epistemic_uncertainty, reference.epistemic_uncertainty * out.uncertainty_mask, atol=1e-5, rtol=1e-4)


def test_pipeline_and_score_rows_carry_the_risk(risky_model, tmp_path):
    import json

    from test_auto import pad_ready_tokenizer
    from transformers import pipeline

    from hf_eu.jsonl_scoring import score_jsonl

    model, detector = risky_model
    model.detector = detector
    tokenizer = pad_ready_tokenizer()
    generator = pipeline("text-generation-with-uncertainty", model=model, tokenizer=tokenizer)
    record = generator("w1 w5 w9 w13", max_new_tokens=4, do_sample=False)[0]
    assert 0.0 <= record["answer_risk"] <= 1.0
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "w1 w5", "answer": "w9 w13 w17"}) + "\n")
    score_jsonl(model, tokenizer, str(rows), str(tmp_path / "scored.jsonl"), progress=False)
    scored = json.loads((tmp_path / "scored.jsonl").read_text().splitlines()[0])
    assert 0.0 <= scored["answer_risk"] <= 1.0


def test_recipe_abstains_on_the_risk(risky_model):
    import importlib.util
    import os

    from test_auto import pad_ready_tokenizer

    from hf_eu import EUThresholdCriteria

    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "abstain_chat.py")
    spec = importlib.util.spec_from_file_location("abstain_chat", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    model, detector = risky_model
    model.detector = detector
    tokenizer = pad_ready_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    messages = [{"role": "user", "content": "w1 w5 w9"}]
    never = EUThresholdCriteria(model, 1e6)
    risky = recipe.answer(model, tokenizer, messages, never, max_new_tokens=4, max_risk=0.0)
    assert risky["reply"] == recipe.ABSTENTION and 0 < risky["risk"] <= 1 and not risky["stopped"]
    trusted = recipe.answer(model, tokenizer, messages, never, max_new_tokens=4, max_risk=1.0)
    assert trusted["reply"] == trusted["generated"]
