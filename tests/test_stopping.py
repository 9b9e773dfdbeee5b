"""EU-aware stopping: the rows whose running EU crosses the threshold stop at the first crossing, others run on.

The expected stops are computed here from the post-hoc EU of the unstopped generation (the same
tokens: stopping one row does not change another's), with a plain loop over each row.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import EOS_ID, PAD_ID
from test_streaming import tokenizer  # noqa: F401  (fixture: a byte-level tokenizer over the tiny vocabulary)
from transformers import StoppingCriteriaList

from hf_eu import EUThresholdCriteria

MAX_NEW = 10
RECIPE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "abstain_chat.py")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine two threads spin-wait
    (this file ran ~40x slower with them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _expected_stops(eu, new_tokens, mask, threshold, window, aggregate, min_new_tokens):
    """(B,) index of the new token at which each row stops for uncertainty, -1 where it does not."""
    stops = []
    for row in range(eu.shape[0]):
        stop = -1
        for j in range(eu.shape[1]):
            if not mask[row, j]:
                break
            recent = eu[row, max(0, j - window + 1) : j + 1].tolist()
            value = max(recent) if aggregate == "max" else sum(recent) / len(recent)
            if value > threshold and j + 1 >= min_new_tokens:
                stop = -1 if new_tokens[row, j] == EOS_ID else j
                break
            if new_tokens[row, j] == EOS_ID:
                break
        stops.append(stop)
    return torch.tensor(stops)


def _running(eu, window, aggregate):
    """(B, T) aggregate of each row's last `window` values at each step."""
    columns = []
    for j in range(eu.shape[1]):
        recent = eu[:, max(0, j - window + 1) : j + 1]
        columns.append(recent.max(-1).values if aggregate == "max" else recent.mean(-1))
    return torch.stack(columns, 1)


def _generate(eu_model, batch, seed, **kwargs):
    torch.manual_seed(seed)
    return eu_model.generate(**batch, max_new_tokens=MAX_NEW, return_dict_in_generate=True, **kwargs)


def _check_stopped_generation(eu_model, batch, full, stopped, criteria, expected):
    prompt_length = batch["input_ids"].shape[1]
    assert stopped.stopped_for_uncertainty.tolist() == (expected >= 0).tolist()
    assert criteria.stop_step.tolist() == expected.tolist()
    for row, stop in enumerate(expected.tolist()):
        if stop < 0:  # runs on exactly as without the criterion
            assert torch.equal(stopped.sequences[row], full.sequences[row, : stopped.sequences.shape[1]])
            continue
        end = prompt_length + stop + 1  # the crossing token is kept
        assert torch.equal(stopped.sequences[row, :end], full.sequences[row, :end])
        assert (stopped.sequences[row, end:] == PAD_ID).all()
    computed = criteria.uncertainty.shape[1]
    mask = stopped.uncertainty_mask[:, :computed]
    torch.testing.assert_close(criteria.uncertainty[mask], full.epistemic_uncertainty[:, :computed][mask],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("window,aggregate", [(1, "mean"), (3, "mean"), (2, "max")])
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_one_row_stops_at_its_first_crossing_the_other_runs_to_max_new_tokens(eu_model, batch, window, aggregate,
                                                                              sampling):
    kwargs = dict(do_sample=sampling, min_new_tokens=MAX_NEW)  # no EOS: rows run to MAX_NEW unless stopped
    full = _generate(eu_model, batch, 1, **kwargs)
    assert full.stopped_for_uncertainty is None
    running = _running(full.epistemic_uncertainty, window, aggregate)  # (2, MAX_NEW)
    low, high = sorted(running.max(-1).values.tolist())
    threshold = (low + high) / 2  # exactly one row's running EU crosses it
    criteria = EUThresholdCriteria(eu_model, threshold, window=window, aggregate=aggregate)
    stopped = _generate(eu_model, batch, 1, stopping_criteria=StoppingCriteriaList([criteria]), **kwargs)

    expected = _expected_stops(full.epistemic_uncertainty, full.sequences[:, -MAX_NEW:], full.uncertainty_mask,
                               threshold, window, aggregate, 0)
    assert sorted((expected >= 0).tolist()) == [False, True]
    assert stopped.sequences.shape == full.sequences.shape, "the other row ran to max_new_tokens"
    _check_stopped_generation(eu_model, batch, full, stopped, criteria, expected)


def test_min_new_tokens_delays_the_stop(eu_model, batch):
    criteria = EUThresholdCriteria(eu_model, threshold=0.0, min_new_tokens=3)  # every token's EU is > 0
    out = _generate(eu_model, batch, 0, stopping_criteria=[criteria], min_new_tokens=MAX_NEW)
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + 3
    assert out.stopped_for_uncertainty.tolist() == [True, True] and criteria.stop_step.tolist() == [2, 2]


def test_a_row_ending_with_eos_is_not_counted_as_stopped(eu_model, batch):
    full = _generate(eu_model, batch, 0, do_sample=False)
    new_tokens = full.sequences[:, -MAX_NEW:]
    ends = full.uncertainty_mask.sum(-1) - 1  # (B,) index of each row's last real token
    eos_rows = [r for r in range(2) if new_tokens[r, ends[r]] == EOS_ID]
    assert eos_rows == [0], "with these seeds row 0 ends with EOS"
    threshold = float(full.epistemic_uncertainty[0, ends[0]]) - 1e-3  # row 0's EOS token crosses it
    expected = _expected_stops(full.epistemic_uncertainty, new_tokens, full.uncertainty_mask, threshold, 1, "mean", 0)
    assert expected[0] == -1
    criteria = EUThresholdCriteria(eu_model, threshold)
    stopped = _generate(eu_model, batch, 0, do_sample=False, stopping_criteria=[criteria])
    _check_stopped_generation(eu_model, batch, full, stopped, criteria, expected)


def test_a_threshold_above_every_eu_changes_nothing(eu_model, batch):
    full = _generate(eu_model, batch, 0, do_sample=False)
    criteria = EUThresholdCriteria(eu_model, 1e6, window=4, aggregate="max")
    out = _generate(eu_model, batch, 0, do_sample=False, stopping_criteria=[criteria])
    assert torch.equal(out.sequences, full.sequences)
    assert out.stopped_for_uncertainty.tolist() == [False, False] and criteria.stop_step.tolist() == [-1, -1]


@pytest.mark.parametrize("prepared", [True, False], ids=["prepare", "pad-heuristic"])
def test_the_targets_own_generate_stops_the_same_rows(eu_model, batch, prepared):
    full = _generate(eu_model, batch, 0, do_sample=False, min_new_tokens=MAX_NEW)
    threshold = float(full.epistemic_uncertainty.max(-1).values.min()) - 1e-3  # both rows cross somewhere
    wrapped = EUThresholdCriteria(eu_model, threshold)
    through_wrapper = _generate(eu_model, batch, 0, do_sample=False, min_new_tokens=MAX_NEW, stopping_criteria=[wrapped])
    direct = EUThresholdCriteria(eu_model, threshold)
    for _ in range(2):  # reused across calls
        if prepared:
            direct.prepare(batch["attention_mask"])
        sequences = eu_model.target.generate(**batch, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                                             stopping_criteria=StoppingCriteriaList([direct]))
        assert torch.equal(sequences, through_wrapper.sequences)
        assert torch.equal(direct.stopped_for_uncertainty, through_wrapper.stopped_for_uncertainty)
        assert torch.equal(direct.stop_step, wrapped.stop_step)
    assert through_wrapper.stopped_for_uncertainty.tolist() == [True, True]


def test_assisted_decoding_stops_after_the_accepted_run(eu_model):
    prompt = {"input_ids": torch.tensor([[1, 5, 9, 13, 17, 21]])}
    kwargs = dict(do_sample=False, min_new_tokens=MAX_NEW, assistant_draft=0)
    full = _generate(eu_model, prompt, 0, **kwargs)
    criteria = EUThresholdCriteria(eu_model, threshold=float(full.epistemic_uncertainty[0, 4]) - 1e-3, window=1)
    expected = _expected_stops(full.epistemic_uncertainty, full.sequences[:, -MAX_NEW:], full.uncertainty_mask,
                               criteria.threshold, 1, "mean", 0)
    stopped = _generate(eu_model, prompt, 0, stopping_criteria=[criteria], **kwargs)
    assert criteria.stop_step.tolist() == expected.tolist() and stopped.stopped_for_uncertainty.tolist() == [True]
    length = stopped.sequences.shape[1]  # the stop takes effect after the run of tokens accepted with the crossing one
    assert length >= prompt["input_ids"].shape[1] + expected[0] + 1
    assert torch.equal(stopped.sequences[0], full.sequences[0, :length])
    computed = criteria.uncertainty.shape[1]
    torch.testing.assert_close(criteria.uncertainty[0], full.epistemic_uncertainty[0, :computed], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(threshold=-0.1), "threshold.*-0.1"),
    (dict(threshold=math.nan), "threshold.*nan"),
    (dict(threshold=math.inf), "threshold.*inf"),
    (dict(threshold="1.0"), "threshold.*'1.0'"),
    (dict(threshold=1.0, window=0), "window.*0"),
    (dict(threshold=1.0, window=2.5), "window.*2.5"),
    (dict(threshold=1.0, aggregate="median"), "aggregate.*'median'"),
    (dict(threshold=1.0, min_new_tokens=-1), "min_new_tokens.*-1"),
])
def test_bad_arguments_are_refused_naming_the_value(eu_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        EUThresholdCriteria(eu_model, **kwargs)


def test_beam_search_is_refused(eu_model, batch):
    with pytest.raises(ValueError, match="num_beams=2"):
        eu_model.generate(**batch, num_beams=2, max_new_tokens=3, stopping_criteria=[EUThresholdCriteria(eu_model, 1.0)])


def _recipe():
    spec = importlib.util.spec_from_file_location("abstain_chat", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("threshold,abstains", [(0.0, True), (1e6, False)])
def test_recipe_abstains_exactly_when_the_criterion_stopped(eu_model, tokenizer, threshold, abstains):  # noqa: F811
    recipe = _recipe()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    messages = [{"role": "user", "content": "abc"}]
    result = recipe.answer(eu_model, tokenizer, messages, EUThresholdCriteria(eu_model, threshold), max_new_tokens=6)
    assert result["stopped"] is abstains
    assert (result["reply"] == recipe.ABSTENTION) is abstains
    assert result["mean_eu"] > 0


@pytest.mark.slow
def test_recipe_runs_on_the_default_model():
    completed = subprocess.run([sys.executable, RECIPE, "--question", "What is 2+3?", "--max-new-tokens", "24"],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "User: What is 2+3?" in completed.stdout
    reply = completed.stdout.split("Assistant: ")[1].splitlines()[0]
    assert "5" in reply, completed.stdout  # greedy: "2 + 3 = 5"; its running EU (≈ 0.2 nats) stays below 9.5
    assert "[answered; mean EU" in completed.stdout
