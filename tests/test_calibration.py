"""hf_eu_calibrated: the stored calibrator reproduces scikit-learn's predictions, survives a composite round
trip, and `generate` returns calibrator(features) computed from the drafts, proxy and target."""

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from hf_eu import UncertaintyAwareModelForCausalLM, get_estimator, score_tokens
from hf_eu.calibration import EUCalibrator
from trainers.calibration import answer_greedily, calibration_features, fit_calibrator, token_values


def synthetic(n=400, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.gamma(1.0, 0.3, size=(n, 4))
    truth = 0.05 * features[:, 0] + 0.01 * np.log1p(features[:, 2]) + 0.002 * rng.normal(size=n).clip(-1, 1)
    return features, truth.clip(0)


def test_fitted_calibrator_equals_sklearn_and_learns(tmp_path):
    from sklearn.neural_network import MLPRegressor

    features, truth = synthetic()
    calibrator = fit_calibrator(features, truth, seed=3)
    logged = np.log(features + calibrator.floor)
    standardized = (logged - calibrator.feature_mean.numpy()) / calibrator.feature_std.numpy()
    reference = MLPRegressor(hidden_layer_sizes=(16,), alpha=1e-3, learning_rate_init=3e-3, max_iter=2000,
                             early_stopping=True, n_iter_no_change=50, random_state=3).fit(standardized, truth)
    expected = reference.predict(standardized).clip(0)
    got = calibrator(torch.tensor(features)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    constant_rmse = np.sqrt(np.mean((truth - truth.mean()) ** 2))
    assert np.sqrt(np.mean((got - truth) ** 2)) < 0.5 * constant_rmse  # it learned something
    calibrator.save(tmp_path)
    loaded = EUCalibrator.load(tmp_path)
    assert_close(loaded(torch.tensor(features)), torch.tensor(got))
    assert loaded.info["tokens"] == len(truth)


def test_calibrator_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="Only 3 tokens"):
        fit_calibrator(np.ones((3, 4)), np.ones(3))
    with pytest.raises(ValueError, match=r"features \(N, 4\)"):
        fit_calibrator(np.ones((30, 3)), np.ones(30))
    with pytest.raises(FileNotFoundError, match="calibrator.json"):
        EUCalibrator.load(tmp_path)
    calibrator = fit_calibrator(*synthetic(50))
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        calibrator(torch.ones(2, 3))


def test_generate_returns_the_calibrated_estimate_and_composites_keep_it(eu_model, batch, tmp_path):
    eu_model.calibrator = fit_calibrator(*synthetic())
    out = eu_model.generate(**batch, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                            estimator="hf_eu_calibrated")
    prompt = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, prompt:])], 1)
    features = [score_tokens(get_estimator(name), out.sequences, prompt, drafts=eu_model.drafts, proxy=eu_model.proxy,
                             target=eu_model.target, attention_mask=mask) for name in ("hf_eu", "proxy_entropy", "entropy")]
    stacked = torch.stack([features[0].eu_variance, features[0].eu_bias, features[1].epistemic_uncertainty,
                           features[2].epistemic_uncertainty], -1)  # (B, T, 4)
    expected = eu_model.calibrator(stacked.flatten(0, 1)).view_as(out.epistemic_uncertainty)
    assert_close(out.epistemic_uncertainty, expected * out.uncertainty_mask, atol=1e-5, rtol=1e-4)

    eu_model.save_pretrained(tmp_path / "composite")
    assert (tmp_path / "composite" / "calibrator" / "calibrator.safetensors").is_file()
    loaded = UncertaintyAwareModelForCausalLM.from_pretrained(tmp_path / "composite", target=eu_model.target)
    assert loaded.config.has_calibrator
    again = loaded.estimate_uncertainty(out.sequences, mask, prompt, estimator="hf_eu_calibrated")
    assert_close(again.epistemic_uncertainty * out.uncertainty_mask, out.epistemic_uncertainty, atol=1e-5, rtol=1e-4)


def test_answers_and_features_pipeline_on_tiny_models(eu_model):
    class Tokenizer:  # the chat template of a tiny vocabulary: BOS, the question's ids, an assistant marker
        pad_token_id, eos_token_id = 0, 2

        def apply_chat_template(self, messages, **kwargs):
            return {"input_ids": [1] + [int(c) for c in messages[0]["content"].split()] + [63]}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(int(i)) for i in ids)

    answers = answer_greedily(eu_model.target, Tokenizer(), ["5 9 13", "7 11"], max_new_tokens=4, batch_size=2,
                              progress=False)
    alone = answer_greedily(eu_model.target, Tokenizer(), ["7 11"], max_new_tokens=4, progress=False)
    assert torch.equal(answers[1]["answer_ids"], alone[0]["answer_ids"])  # left padding changes nothing
    parts = dict(drafts=eu_model.drafts, proxy=eu_model.proxy, target=eu_model.target, pad_id=0, batch_size=2)
    features = calibration_features(answers, **parts)
    eu, _ = token_values("hf_eu", answers, **parts)
    for row, answer in enumerate(answers):
        assert features[row].shape == (len(answer["answer_ids"]), 4)
        np.testing.assert_allclose(features[row][:, 0] + features[row][:, 1], eu[row], rtol=1e-5, atol=1e-6)
        ids = torch.cat([answer["prompt_ids"], answer["answer_ids"]])[None]
        single = eu_model.estimate_uncertainty(ids, prompt_length=len(answer["prompt_ids"]))
        np.testing.assert_allclose(eu[row], single.epistemic_uncertainty[0].numpy(), rtol=1e-4, atol=1e-5)
