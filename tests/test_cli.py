"""The `hf-eu` command line: generate, score (exact rows, resumable, 2 processes under accelerate), train, help."""

import importlib.metadata
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoTokenizer

from hf_eu import UncertaintyAwareModelForCausalLM
from hf_eu.cli import main
from hf_eu.jsonl_scoring import parts_folder

from test_auto import save_composite_with_tokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
NUM_ROWS = 11


@pytest.fixture(scope="module")
def composite(tmp_path_factory, target, drafts, proxy):
    return save_composite_with_tokenizer(tmp_path_factory.mktemp("cli"), target, drafts, proxy)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """NUM_ROWS prompt/answer rows of 1-4 and 1-5 words (so batches need left and right padding)."""
    rng = random.Random(0)
    words = lambda n: " ".join(f"w{rng.randrange(3, 64)}" for _ in range(n))  # noqa: E731
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"id": i, "question": words(rng.randint(1, 4)), "answer": words(rng.randint(1, 5))} for i in range(NUM_ROWS)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")  # a trailing blank line
    return str(path)


def score_args(pairs, out, composite, *extra):
    return ["score", pairs, "--out", str(out), "--model", composite, "--prompt-field", "question",
            "--batch-size", "3", "--no-progress", *extra]


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, pairs, composite):
    """One uninterrupted single-process run: the reference output."""
    out = tmp_path_factory.mktemp("scored") / "scored.jsonl"
    assert main(score_args(pairs, out, composite)) == 0
    return read_jsonl(out)


class CountingScorer:
    """Wraps `estimate_uncertainty` to count the rows it scores; raises KeyboardInterrupt on call `fail_on_call`."""

    def __init__(self, monkeypatch, fail_on_call=None):
        self.rows, self.calls, self.fail_on_call = 0, 0, fail_on_call
        original = UncertaintyAwareModelForCausalLM.estimate_uncertainty

        def counted(model, input_ids, *args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_on_call:
                raise KeyboardInterrupt
            self.rows += input_ids.shape[0]
            return original(model, input_ids, *args, **kwargs)

        monkeypatch.setattr(UncertaintyAwareModelForCausalLM, "estimate_uncertainty", counted)


# ------------------------------------------------------------------------------------------------ score
def test_score_writes_every_row_in_order_with_teacher_forced_eu(scored, pairs, composite):
    inputs = read_jsonl(pairs)
    assert [row["id"] for row in scored] == list(range(NUM_ROWS))
    model = UncertaintyAwareModelForCausalLM.from_pretrained(composite)
    tokenizer = AutoTokenizer.from_pretrained(model.config.target_name_or_path)
    for given, row in zip(inputs, scored):
        assert {k: row[k] for k in given} == given  # the input fields, unchanged
        prompt_ids = tokenizer(given["question"])["input_ids"]
        answer_ids = tokenizer(given["answer"], add_special_tokens=False)["input_ids"]
        alone = model.estimate_uncertainty(torch.tensor([prompt_ids + answer_ids]), prompt_length=len(prompt_ids))
        assert row["token_ids"] == answer_ids and "".join(row["tokens"]) == given["answer"]
        assert_close(torch.tensor(row["epistemic_uncertainty"]), alone.epistemic_uncertainty[0], rtol=1e-4, atol=1e-5)
        assert_close(torch.tensor(row["eu_bias"]), alone.eu_bias[0], rtol=1e-4, atol=1e-5)
        assert row["eu_sum"] == pytest.approx(sum(row["epistemic_uncertainty"]), rel=1e-5)
        assert row["eu_max"] == pytest.approx(max(row["epistemic_uncertainty"]), rel=1e-6)


def test_interrupted_score_resumes_without_rescoring(tmp_path, monkeypatch, scored, pairs, composite):
    out = tmp_path / "scored.jsonl"
    interrupted = CountingScorer(monkeypatch, fail_on_call=3)  # dies while scoring the third batch of 3
    with pytest.raises(KeyboardInterrupt):
        main(score_args(pairs, out, composite))
    assert not out.exists(), "an interrupted run must not leave an output that looks complete"
    assert interrupted.rows == 6
    monkeypatch.undo()  # the next counter wraps the real method
    part = os.path.join(parts_folder(out), "process-0.jsonl")
    assert [json.loads(line)["index"] for line in open(part)] == list(range(6))
    with open(part, "a") as handle:
        handle.write('{"index": 6, "row": {"id": 6, "que')  # a line cut off by the interruption

    resumed = CountingScorer(monkeypatch)
    assert main(score_args(pairs, out, composite)) == 0
    assert resumed.rows == NUM_ROWS - 6  # only the rows no part file held
    assert read_jsonl(out) == scored
    assert not os.path.exists(parts_folder(out))


def test_score_refuses_to_mix_runs_or_overwrite(tmp_path, monkeypatch, pairs, composite, capsys):
    out = tmp_path / "scored.jsonl"
    os.makedirs(parts_folder(out))
    with open(os.path.join(parts_folder(out), "fingerprint.json"), "w") as handle:
        json.dump({"input_sha256": "0" * 64, "prompt_field": "question"}, handle)
    assert main(score_args(pairs, out, composite)) == 1
    assert "holds parts of a run with a different answer_field, chat_template, estimator, input_sha256, target" \
        in capsys.readouterr().err
    assert main(score_args(pairs, out, composite, "--overwrite")) == 0  # starts over
    assert len(read_jsonl(out)) == NUM_ROWS
    assert main(score_args(pairs, out, composite)) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "extra", "message"), [
    ('{"question": "w1", "answer": "w2"}\n{"question": "w1", "answer": \n', [], r"line 2: not valid JSON"),
    ('{"question": "w1", "answer": "w2"}\n\n[1, 2]\n', [], r"line 3: expected a JSON object, got list"),
    ('{"question": "w1", "answer": "w2"}\n{"q": "w1", "answer": "w2"}\n', [],
     r"line 2: field 'question' must be a non-empty string, got missing .*--prompt-field"),
    ('{"question": "w1", "reply": "w2"}\n', ["--answer-field", "reply"], None),
    ('{"question": "w1", "reply": "w2"}\n', [], r"line 1: field 'answer' .*--answer-field"),
])
def test_bad_input_lines_name_their_line_and_score_nothing(tmp_path, monkeypatch, composite, capsys, content, extra,
                                                          message):
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    path.write_text(content, encoding="utf-8")
    counter = CountingScorer(monkeypatch)
    status = main(score_args(str(path), out, composite, *extra))
    if message is None:
        assert status == 0 and counter.rows == 1 and len(read_jsonl(out)) == 1
        return
    assert status == 1 and counter.calls == 0
    assert capsys.readouterr().err.count("error:") == 1
    assert not out.exists() and not os.path.exists(parts_folder(out))


def test_missing_input_file_is_named(tmp_path, composite, capsys):
    missing = str(tmp_path / "nope.jsonl")
    assert main(["score", missing, "--out", str(tmp_path / "o.jsonl"), "--model", composite]) == 1
    assert f"Input file {missing!r} does not exist" in capsys.readouterr().err


def test_score_under_accelerate_launch_with_two_processes(tmp_path, scored, pairs, composite):
    out = tmp_path / "scored.jsonl"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "hf_eu.cli", *score_args(pairs, out, composite)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 1/2 scored 6 rows" in result.stderr and "process 2/2 scored 5 rows" in result.stderr
    rows = read_jsonl(out)
    assert [row["id"] for row in rows] == list(range(NUM_ROWS))  # all rows, input order, no duplicates
    for row, reference in zip(rows, scored):  # batches differ (rows 0,2,4,.. vs 1,3,5,..): equal up to float noise
        assert set(row) == set(reference)  # every field, not only the EU
        for key, value in reference.items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                assert_close(torch.tensor(row[key], dtype=torch.float64), torch.tensor(value, dtype=torch.float64),
                             rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"field {key!r}: {m}")
            else:
                assert row[key] == value, f"field {key!r} differs between 2 processes and 1"
    assert not os.path.exists(parts_folder(out))


# --------------------------------------------------------------------------------------------- generate
def test_generate_json_equals_the_wrappers_generate(tmp_path, composite, capsys):
    html, png = tmp_path / "a.html", tmp_path / "a.png"
    assert main(["generate", "w1 w5 w9", "--model", composite, "--max-new-tokens", "6", "--json",
                 "--html", str(html), "--png", str(png)]) == 0
    record = json.loads(capsys.readouterr().out)
    model = UncertaintyAwareModelForCausalLM.from_pretrained(composite)
    prompt = torch.tensor([[1, 5, 9]])  # the word tokenizer has no chat template and adds no special tokens
    out = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    mask = out.uncertainty_mask[0]
    assert record["token_ids"] == out.sequences[0, 3:][mask].tolist()
    assert_close(torch.tensor(record["epistemic_uncertainty"]), out.epistemic_uncertainty[0][mask])
    assert record["eu_sum"] == pytest.approx(float(out.epistemic_uncertainty[0][mask].sum()), rel=1e-5)
    assert html.read_text(encoding="utf-8").count('class="tok"') == len(record["tokens"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_prints_coloured_answer(composite, capsys):
    assert main(["generate", "w1 w5 w9", "--model", composite, "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "Q: w1 w5 w9" in printed and "A: " in printed and "EU: sum" in printed and "nats" in printed


def test_generate_model_errors(tmp_path, composite, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path)]) == 1
    assert "is not a saved hf_eu composite" in capsys.readouterr().err
    assert main(["generate", "hi", "--target", composite]) == 1
    assert "pass --model too" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ train, help
def test_train_passes_arguments_through(monkeypatch):
    import hf_eu.trainers.run_osd  # the installed name of trainers/ (pyproject.toml's package-dir)

    seen = []
    monkeypatch.setattr(hf_eu.trainers.run_osd, "main", seen.append)
    assert main(["train", "osd", "--dataset_path", "d", "--max_steps", "2"]) == 0
    assert seen == [["--dataset_path", "d", "--max_steps", "2"]]


def test_train_without_trainers_package_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hf_eu.trainers.run_ddd", None)  # import now fails as if it were absent
    assert main(["train", "ddd"]) == 1
    err = capsys.readouterr().err
    assert "the `hf_eu.trainers` package is not importable" in err and "python -m trainers.run_ddd" in err


@pytest.mark.parametrize(("argv", "expected"), [
    ([], ["generate", "score", "train", "accelerate launch"]),
    (["generate"], ["--model", "--json", "--html", "--png", "--max-new-tokens", "--no-chat-template", "--seed"]),
    (["score"], ["--out", "--prompt-field", "--answer-field", "--batch-size", "--overwrite", "Resumable", "--cpu"]),
    (["train"], ["ddd", "osd", "defaults", "hf_eu.trainers.run_ddd"]),
    (["train", "ddd"], ["--partition_index", "--num_prompt_groups"]),  # the script's own help
])
def test_help_is_complete(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert all(word in printed for word in expected), [w for w in expected if w not in printed]


def test_entry_point_is_installed():
    [script] = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "hf-eu"]
    assert script.value == "hf_eu.cli:main"
