"""Nothing lost, nothing silently wrong: saving never deletes what hf_eu did not write, a save killed
halfway leaves a composite that the next save or load restores, resumed runs refuse another model,
damaged part/shard files and an output that is the input, and pickled weights are never opened."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from hf_eu import UncertaintyAwareModelForCausalLM
from hf_eu import _atomic
from hf_eu.cli import main
from hf_eu.fingerprint import model_fingerprint
from hf_eu.jsonl_scoring import parts_folder
from hf_eu.loading import load_causal_lm

from conftest import tiny_llama
from test_auto import save_composite_with_tokenizer
from test_training_data import PROMPTS, SETTINGS, _tokenizer
from trainers.data import SETTINGS_FILE, generate_responses


def tree(folder) -> dict[str, bytes]:
    """Every file below `folder` with its bytes."""
    files = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            files[os.path.relpath(path, folder)] = open(path, "rb").read()
    return files


def hidden_siblings(folder) -> list[str]:
    parent, name = os.path.split(os.fspath(folder))
    return sorted(entry for entry in os.listdir(parent) if entry.startswith(f".{name}."))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture()
def target_dir(tmp_path, target):
    folder = tmp_path / "target"
    target.save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def local_model(target_dir, drafts, proxy):
    return UncertaintyAwareModelForCausalLM.from_pretrained(target_dir, drafts=drafts, proxy=proxy)


def draft_weight(model_or_folder):
    model = model_or_folder
    if isinstance(model_or_folder, str):
        model = UncertaintyAwareModelForCausalLM.from_pretrained(model_or_folder)
    return model.drafts[0].lm_head.weight.detach().clone()


# ------------------------------------------------------------------ 1. saving deletes nothing it did not write
def _forbid_work(monkeypatch):
    import hf_eu.serialization as serialization

    def fail(*args, **kwargs):
        pytest.fail("a refused save wrote a part before checking the destination")

    monkeypatch.setattr(serialization, "_save_model", fail)


def test_save_refuses_a_folder_of_other_files(tmp_path, local_model, monkeypatch):
    folder = tmp_path / "my-stuff"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "sub" / "data.bin").write_bytes(b"\x00\x01")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    before = tree(folder)
    _forbid_work(monkeypatch)
    with pytest.raises(ValueError, match=r"Refusing to save the composite to .*my-stuff.*not an hf_eu composite "
                                         r".*holds config.json, which the composite would overwrite.*empty or new "
                                         r"folder, a previous hf_eu composite"):
        local_model.save_pretrained(folder)
    assert tree(folder) == before
    assert hidden_siblings(folder) == []
    (folder / "config.json").unlink()
    (folder / "README.md").write_text("my own card")  # any entry a composite writes is refused the same way
    before = tree(folder)
    with pytest.raises(ValueError, match=r"holds README.md, which the composite would overwrite"):
        local_model.save_pretrained(folder)
    assert tree(folder) == before


def test_save_beside_other_files_leaves_them_and_replaces_only_its_own(tmp_path, local_model):
    """A `Trainer` output folder (checkpoints, logs) takes the composite beside its files; saving again replaces the
    composite's entries only, and drops those the new composite no longer has."""
    folder = tmp_path / "run"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"\x00\x01")
    (folder / "training_args.bin").write_bytes(b"\x02")
    theirs = tree(folder)
    local_model.save_pretrained(folder, save_target=True)
    assert {path: data for path, data in tree(folder).items() if path in theirs} == theirs
    assert (folder / "model.safetensors").is_file() and draft_weight(str(folder)) is not None
    local_model.drafts[0].lm_head.weight.data.add_(1.0)
    local_model.save_pretrained(folder, save_target=False)
    assert {path: data for path, data in tree(folder).items() if path in theirs} == theirs
    assert not (folder / "model.safetensors").exists()  # the previous composite's target weights went with it
    assert torch.equal(draft_weight(str(folder)), local_model.drafts[0].lm_head.weight)
    assert hidden_siblings(folder) == [] and not [name for name in os.listdir(folder) if name.startswith(".")]


def test_save_refuses_a_regular_file(tmp_path, local_model, monkeypatch):
    path = tmp_path / "composite"
    path.write_text("not a folder")
    _forbid_work(monkeypatch)
    with pytest.raises(ValueError, match=r"composite.*is a file, not a folder.*empty or new folder"):
        local_model.save_pretrained(path)
    assert path.read_text() == "not a folder"


def test_save_refuses_the_targets_own_folder(tmp_path, target_dir, local_model, monkeypatch):
    before = tree(target_dir)
    _forbid_work(monkeypatch)
    with pytest.raises(ValueError, match=r"it is the target's own folder.*empty or new folder"):
        local_model.save_pretrained(target_dir)
    with pytest.raises(ValueError, match=r"Refusing to save"):  # its parent holds the target folder
        local_model.save_pretrained(tmp_path)
    assert tree(target_dir) == before


def test_save_refuses_a_composite_that_contains_the_target(tmp_path, target, drafts, local_model):
    composite = tmp_path / "composite"
    local_model.save_pretrained(composite)
    inner = composite / "base"  # a target kept inside a composite folder would go with the old composite
    target.save_pretrained(inner)
    model = UncertaintyAwareModelForCausalLM.from_pretrained(str(inner), drafts=drafts)
    with pytest.raises(ValueError, match=r"contains the target's folder .*base"):
        model.save_pretrained(composite)
    assert os.path.isfile(inner / "model.safetensors")


def test_save_into_an_empty_folder_and_over_a_previous_composite(tmp_path, local_model):
    folder = tmp_path / "empty"
    folder.mkdir()
    local_model.save_pretrained(folder)
    first = draft_weight(str(folder))
    local_model.drafts[0].lm_head.weight.data.add_(1.0)
    local_model.save_pretrained(folder)  # a previous composite is replaced
    assert torch.equal(draft_weight(str(folder)), first + 1.0)
    assert hidden_siblings(folder) == []


# ------------------------------------------------------------------ 2. a killed save leaves a recoverable composite
def _kill_after_setting_aside(monkeypatch, folder):
    """os.rename works until the old composite has been set aside; every later call dies (like a kill)."""
    real = os.rename
    state = {"aside": None}

    def rename(src, dst, *args, **kwargs):
        if state["aside"] is not None:
            raise KeyboardInterrupt("killed")
        real(src, dst, *args, **kwargs)
        if os.path.abspath(os.fspath(src)) == os.path.abspath(os.fspath(folder)):
            state["aside"] = os.fspath(dst)

    monkeypatch.setattr(os, "rename", rename)
    return state


@pytest.fixture()
def killed_save(tmp_path, local_model, monkeypatch):
    """A composite saved once, then a second save killed between its two renames."""
    folder = str(tmp_path / "composite")
    local_model.save_pretrained(folder)
    old = draft_weight(local_model)
    local_model.drafts[0].lm_head.weight.data.add_(1.0)
    state = _kill_after_setting_aside(monkeypatch, folder)
    with pytest.raises(KeyboardInterrupt):
        local_model.save_pretrained(folder)
    monkeypatch.undo()
    assert state["aside"] is not None and ".composite.replaced-" in state["aside"]
    assert not os.path.exists(folder), "the simulated kill must hit the window between the two renames"
    assert os.path.isfile(os.path.join(state["aside"], "config.json"))
    return local_model, folder, old


def test_load_restores_the_composite_of_a_killed_save(killed_save):
    _, folder, old = killed_save
    assert torch.equal(draft_weight(folder), old)  # from_pretrained put the previous composite back
    assert os.path.isfile(os.path.join(folder, "config.json"))
    assert hidden_siblings(folder) == []


def test_next_save_restores_then_replaces(killed_save):
    model, folder, old = killed_save
    model.save_pretrained(folder)
    assert torch.equal(draft_weight(folder), old + 1.0)
    assert hidden_siblings(folder) == []


def test_a_dead_process_aside_is_restored_and_its_leftovers_removed(tmp_path, local_model):
    folder = str(tmp_path / "composite")
    local_model.save_pretrained(folder)
    old = draft_weight(local_model)
    parent = str(tmp_path)
    dead = _atomic.owner_tag(dead_pid())
    # the state a process killed between the renames leaves: the old composite aside, its staging folder
    os.rename(folder, os.path.join(parent, f".composite.replaced-{dead}-abc123"))
    os.makedirs(os.path.join(parent, f".composite.saving-{dead}-def456", "drafts"))
    alive = os.path.join(parent, f".composite.saving-{_atomic.owner_tag(os.getppid())}-live")  # a save in progress
    other_host = os.path.join(parent, ".composite.saving-1@00000000-remote")  # another machine's: not ours to judge
    os.makedirs(alive)
    os.makedirs(other_host)

    assert torch.equal(draft_weight(folder), old)  # the load restored the aside copy
    assert sorted(hidden_siblings(folder)) == sorted([f".composite.saving-{dead}-def456", os.path.basename(alive),
                                                      os.path.basename(other_host)])
    local_model.drafts[0].lm_head.weight.data.add_(1.0)
    local_model.save_pretrained(folder)  # the next save removes what dead saves left
    assert sorted(hidden_siblings(folder)) == sorted([os.path.basename(alive), os.path.basename(other_host)])
    assert torch.equal(draft_weight(folder), old + 1.0)


def test_staging_folders_carry_their_owner(tmp_path, local_model, monkeypatch):
    import hf_eu.serialization as serialization

    seen = []
    real = serialization._replace_folder
    monkeypatch.setattr(serialization, "_replace_folder", lambda staging, folder: seen.append(staging) or
                        real(staging, folder))
    local_model.save_pretrained(tmp_path / "composite")
    assert os.path.basename(seen[0]).startswith(f".composite.saving-{os.getpid()}@")


# ------------------------------------------------------------------ 3. resumed runs refuse another model
def test_fingerprint_identifies_a_model(tmp_path, target, drafts):
    target.save_pretrained(tmp_path / "t")
    reloaded = load_causal_lm(str(tmp_path / "t"), role="target")
    assert model_fingerprint(reloaded) == model_fingerprint(target)  # same weights, loaded again
    assert model_fingerprint(drafts[0]) != model_fingerprint(drafts[1])
    assert model_fingerprint(tiny_llama(0).to(torch.bfloat16)) != model_fingerprint(target)
    edited = tiny_llama(0)
    edited.model.layers[1].mlp.down_proj.weight.data.mul_(1.01)
    assert model_fingerprint(edited) != model_fingerprint(target)


NUM_ROWS = 7


@pytest.fixture(scope="module")
def two_composites(tmp_path_factory, target, drafts, proxy):
    """Two composites of the same target folder, with different drafts."""
    first = save_composite_with_tokenizer(tmp_path_factory.mktemp("a"), target, drafts, proxy)
    others = [tiny_llama(seed=40 + k, hidden_size=8, num_layers=1) for k in range(2)]
    target_dir = os.path.join(os.path.dirname(first), "target")
    second = str(tmp_path_factory.mktemp("b") / "composite")
    UncertaintyAwareModelForCausalLM.from_pretrained(target_dir, drafts=others, proxy=proxy).save_pretrained(second)
    return first, second


@pytest.fixture()
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"id": i, "question": f"w{3 + i} w{10 + i}", "answer": f"w{20 + i} w{30 + i} w5"} for i in range(NUM_ROWS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def score(pairs, out, composite, *extra):
    return main(["score", pairs, "--out", str(out), "--model", composite, "--prompt-field", "question",
                 "--batch-size", "2", "--no-progress", *extra])


def interrupted_run(monkeypatch, pairs, out, composite, batches=2):
    """Score `batches` batches, then die; return the part file."""
    original = UncertaintyAwareModelForCausalLM.estimate_uncertainty
    calls = []

    def dying(model, *args, **kwargs):
        calls.append(1)
        if len(calls) > batches:
            raise KeyboardInterrupt
        return original(model, *args, **kwargs)

    monkeypatch.setattr(UncertaintyAwareModelForCausalLM, "estimate_uncertainty", dying)
    with pytest.raises(KeyboardInterrupt):
        score(pairs, out, composite)
    monkeypatch.undo()
    return os.path.join(parts_folder(out), "process-0.jsonl")


def test_score_resumed_with_another_model_is_refused(tmp_path, monkeypatch, pairs, two_composites, capsys):
    first, second = two_composites
    out = tmp_path / "scored.jsonl"
    part = interrupted_run(monkeypatch, pairs, out, first)
    before = tree(parts_folder(out))
    assert len(open(part).readlines()) == 4
    assert score(pairs, out, second) == 1
    error = capsys.readouterr().err
    assert "holds parts of a run with a different weights_sha256 (" in error  # the target is the same folder
    assert "same --model, --target and --dtype" in error
    assert tree(parts_folder(out)) == before and not out.exists()  # nothing written
    assert score(pairs, out, first) == 0  # the right model resumes
    assert len(open(out).readlines()) == NUM_ROWS


@pytest.mark.parametrize("damage, message", [
    (lambda lines: lines[:1] + ["\x00" * 20 + "\n"] + lines[2:], r"line 2, is damaged: not valid JSON"),
    (lambda lines: [lines[0], json.dumps({"index": 1, "row": {**json.loads(lines[1])["row"], "epistemic_uncertainty": []}})
                    + "\n", *lines[2:]], r"line 2, is damaged: row 1 lacks its scored tokens"),
    (lambda lines: [lines[0], json.dumps({"index": 1, "row": {**json.loads(lines[1])["row"], "question": "w9"}}) + "\n",
                    *lines[2:]], r"line 2, is damaged: its question differ from input row 1"),
    (lambda lines: [*lines[:3], json.dumps({"index": 99, "row": json.loads(lines[3])["row"]}) + "\n"],
     r"line 4, is damaged: index 99 is past the input's 7 rows"),
])
def test_damaged_part_file_is_detected(tmp_path, monkeypatch, pairs, two_composites, capsys, damage, message):
    first, _ = two_composites
    out = tmp_path / "scored.jsonl"
    part = interrupted_run(monkeypatch, pairs, out, first)
    lines = open(part).readlines()
    with open(part, "w") as handle:
        handle.writelines(damage(lines))
    assert score(pairs, out, first) == 1
    error = capsys.readouterr().err
    assert "process-0.jsonl" in error and "delete that file" in error
    assert re.search(message, error), error
    assert not out.exists()


def test_score_refuses_to_overwrite_its_own_input(tmp_path, pairs, two_composites, capsys):
    first, _ = two_composites
    before = open(pairs, "rb").read()
    relative = os.path.relpath(pairs)
    for out in (pairs, os.path.join(os.path.dirname(pairs), ".", os.path.basename(pairs)), relative):
        assert score(pairs, out, first, "--overwrite") == 1
        assert "is the input file itself" in capsys.readouterr().err
    link = tmp_path / "link.jsonl"
    link.symlink_to(pairs)
    assert score(pairs, link, first, "--overwrite") == 1
    assert "is the input file itself" in capsys.readouterr().err
    inside = tmp_path / "out.jsonl.parts" / "in.jsonl"
    inside.parent.mkdir()
    inside.write_bytes(before)
    assert score(str(inside), tmp_path / "out.jsonl", first, "--overwrite") == 1
    assert "parts folder of --out" in capsys.readouterr().err and inside.read_bytes() == before
    assert open(pairs, "rb").read() == before


# generate_responses
def test_generate_responses_resumed_with_another_target_is_refused(tmp_path):
    out = str(tmp_path / "pool")
    first, second = tiny_llama(seed=3), tiny_llama(seed=4)  # loaded in memory: both record "model": ""
    generate_responses(first, _tokenizer(), PROMPTS, seed=1, output_dir=out, **SETTINGS)
    os.remove(os.path.join(out, "shard-00002.jsonl"))  # interrupted before the last batch
    before = tree(out)
    settings = json.load(open(os.path.join(out, SETTINGS_FILE)))
    assert settings["model"] == "" and settings["weights_sha256"] == model_fingerprint(first)
    with pytest.raises(ValueError, match=r"generated with another target .*mixing two targets' answers"):
        generate_responses(second, _tokenizer(), PROMPTS, seed=1, output_dir=out, **SETTINGS)
    assert tree(out) == before
    resumed = generate_responses(first, _tokenizer(), PROMPTS, seed=1, output_dir=out, **SETTINGS)
    assert len(resumed) == len(PROMPTS) * SETTINGS["num_responses"]


def test_generate_responses_refuses_settings_without_a_fingerprint(tmp_path):
    out = str(tmp_path / "pool")
    model = tiny_llama(seed=3)
    generate_responses(model, _tokenizer(), PROMPTS, seed=1, output_dir=out, **SETTINGS)
    path = os.path.join(out, SETTINGS_FILE)
    settings = json.load(open(path))
    del settings["weights_sha256"]
    json.dump(settings, open(path, "w"))
    with pytest.raises(ValueError, match="older version that did not record the target's fingerprint"):
        generate_responses(model, _tokenizer(), PROMPTS, seed=1, output_dir=out, **SETTINGS)


@pytest.mark.parametrize("damage, message", [
    (lambda lines: lines[:-1], r"it holds 3 rows but its batch has 4"),
    (lambda lines: [lines[1], lines[0], *lines[2:]], r"row 1 is prompt 2 slot 1, expected prompt 2 .* slot 0"),
    (lambda lines: [*lines[:-1], "{not json\n"], r"line 4 is not valid JSON"),
])
def test_damaged_shard_is_refused(tmp_path, damage, message):
    out = str(tmp_path / "pool")
    model = tiny_llama(seed=3)
    generate_responses(model, _tokenizer(), PROMPTS, seed=1, output_dir=out, **SETTINGS)
    shard = os.path.join(out, "shard-00001.jsonl")
    lines = open(shard).readlines()
    assert len(lines) == 4
    with open(shard, "w") as handle:
        handle.writelines(damage(lines))
    with pytest.raises(ValueError, match=rf"Shard .*shard-00001.jsonl is damaged: {message}.*Delete it"):
        generate_responses(model, _tokenizer(), PROMPTS, seed=1, output_dir=out, **SETTINGS)


# ------------------------------------------------------------------ 4. pickled weights are never opened
@pytest.fixture()
def no_unpickling(monkeypatch):
    import pickle

    def fail(*args, **kwargs):
        pytest.fail("a pickle was opened")

    monkeypatch.setattr(torch, "load", fail)
    monkeypatch.setattr(pickle, "load", fail)
    monkeypatch.setattr(pickle, "loads", fail)


def pickled_index_folder(folder, model) -> str:
    """config.json + a safetensors index that names a .bin shard + that (bogus) .bin file."""
    os.makedirs(folder, exist_ok=True)
    model.config.save_pretrained(folder)
    names = list(model.state_dict())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": {name: "pytorch_model.bin" for name in names}}, handle)
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as handle:
        handle.write(b"\x80\x04 not really a pickle")
    return str(folder)


def test_index_naming_a_pickled_shard_is_refused(tmp_path, target, drafts, no_unpickling):
    folder = pickled_index_folder(tmp_path / "bad", drafts[0])
    pattern = r"model.safetensors.index.json names the non-safetensors shard 'pytorch_model.bin'.*Convert"
    with pytest.raises(ValueError, match=pattern):
        load_causal_lm(folder, role="draft 0")
    with pytest.raises(ValueError, match=r"draft 1's weight index .*pytorch_model.bin"):
        UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=[drafts[0], folder])
    with pytest.raises(ValueError, match=r"target's weight index"):
        UncertaintyAwareModelForCausalLM.from_pretrained(pickled_index_folder(tmp_path / "t", target), drafts=drafts)


def test_only_pickled_weights_are_refused(tmp_path, drafts, no_unpickling):
    folder = tmp_path / "pickled"
    folder.mkdir()
    drafts[0].config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 bogus")
    with pytest.raises(ValueError, match=r"only in the pickle file .*pytorch_model.bin.*safetensors"):
        load_causal_lm(str(folder), role="proxy")
    with pytest.raises(ValueError, match="hf_eu reads safetensors only"):
        load_causal_lm(str(folder), role="proxy", use_safetensors=False)


def test_composite_with_a_tampered_draft_is_refused(tmp_path, local_model, no_unpickling):
    folder = tmp_path / "composite"
    local_model.save_pretrained(folder)
    draft = folder / "drafts" / "draft_1"
    os.remove(draft / "model.safetensors")
    pickled_index_folder(draft, local_model.drafts[1])
    with pytest.raises(ValueError, match=r"draft 1's weight index .*draft_1.*pytorch_model.bin"):
        UncertaintyAwareModelForCausalLM.from_pretrained(str(folder))


def test_a_trainer_folder_with_training_args_bin_still_loads(tmp_path, drafts, no_unpickling):
    folder = tmp_path / "checkpoint"
    drafts[0].save_pretrained(folder)
    (folder / "training_args.bin").write_bytes(b"\x80\x04 bogus")  # what Trainer writes beside the weights
    loaded = load_causal_lm(str(folder), role="draft 0")
    assert torch.equal(loaded.lm_head.weight, drafts[0].lm_head.weight)
