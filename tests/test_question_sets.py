"""Nothing the shipped parts were trained or fitted on is evaluated: the recorded question sets are disjoint."""

import json
import os

import pytest

from hf_eu.defaults import DEFAULT_COMPOSITE_DIR, IDD_COMPOSITE_DIR

EVALUATED = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "small", "questions.json")
FITTED = {  # file in a shipped composite -> what was trained or fitted on it
    (DEFAULT_COMPOSITE_DIR, "train_questions.json"): "drafts and proxy",
    (IDD_COMPOSITE_DIR, "train_questions.json"): "IDD drafts",
    (DEFAULT_COMPOSITE_DIR, "calibration_questions.json"): "hf_eu_calibrated's regressor",
    (DEFAULT_COMPOSITE_DIR, "eu_head_questions.json"): "the EU head",
    (DEFAULT_COMPOSITE_DIR, "detector_questions.json"): "the answer-risk detector",
}


def _texts(path):
    return set(json.load(open(path)))


@pytest.mark.parametrize("part", sorted(FITTED), ids=lambda part: os.path.basename(part[0]) + "/" + part[1])
def test_no_training_question_is_evaluated(part):
    sets = json.load(open(EVALUATED))
    evaluated = set(sets["arith"]) | set(sets["gsm"])
    path = os.path.join(*part)
    assert os.path.isfile(path), f"{path} is missing: the shipped {FITTED[part]} must record its questions"
    overlap = _texts(path) & evaluated
    assert not overlap, f"{len(overlap)} questions {FITTED[part]} trained on are evaluated, e.g. {sorted(overlap)[:2]}"
    assert len(sets["arith"]) >= 300 and len(sets["gsm"]) >= 100  # the sizes issue 15 asks for


def test_fitting_sets_are_disjoint_from_each_other():
    sets = json.load(open(EVALUATED))
    names = ["calib", "detect", "arith", "gsm"]
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert not set(sets[first]) & set(sets[second]), f"{first} and {second} share questions"
    assert not _texts(os.path.join(DEFAULT_COMPOSITE_DIR, "eu_head_questions.json")) & set(sets["detect"])
