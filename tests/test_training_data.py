"""Training data for DDD: question sources, sampled response pools (resumable, with teacher top-k) and
the prompt-group x response-slot partitions. Tiny models and a WordLevel tokenizer; no downloads."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from conftest import EOS_ID, PAD_ID, tiny_llama
from datasets import Dataset
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from trainers.data import SETTINGS_FILE, generate_responses
from trainers.partition import parse_scheme, partition_dataset, partition_scheme, select_partition
from trainers.questions import (
    REASONING_GYM_PRESETS,
    TRAIN_SEED_OFFSET,
    gsm8k_questions,
    reasoning_gym_questions,
    training_seed,
)

PROMPTS = ["w1 w5 w6", "w1 w7", "w1 w3 w4 w5 w9 w11", "w1 w8 w8", "w1 w12 w13 w14", "w1 w20"]
SETTINGS = dict(num_responses=2, max_new_tokens=6, batch_size=2, show_progress=False)


def _tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # single_word: a plain "w2" special token would also match inside "w20".."w29"
    eos = AddedToken("w2", single_word=True, special=True)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0", eos_token=eos)


def _ids(text: str) -> list[int]:
    return [int(word[1:]) for word in text.split()]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


def _tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    """Absolute position embeddings: a wrong position id changes its logits (RoPE's would not)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=2, n_head=2, initializer_range=0.5,
                        bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


@pytest.fixture()
def tokenizer():
    return _tokenizer()


# ----------------------------------------------------------------------------- partitions

def _pool(num_prompts: int = 10, num_responses: int = 3) -> Dataset:
    return Dataset.from_list([{"prompt_id": p, "response_slot": r, "text": f"{p}-{r}"}
                              for p in range(num_prompts) for r in range(num_responses)])


def test_partitions_disjoint_cover_balanced_and_seeded():
    pool = _pool(10, 3)
    parted = partition_dataset(pool, 2, 3, seed=0)
    assert sorted(set(parted["partition"])) == list(range(6))
    cells = [select_partition(parted, k) for k in range(6)]
    texts = [t for cell in cells for t in cell["text"]]
    assert sorted(texts) == sorted(pool["text"]) and len(texts) == len(set(texts))  # disjoint and covering
    assert [len(cell) for cell in cells] == [5] * 6
    for k, cell in enumerate(cells):  # each cell: one prompt group, one response slot
        assert set(cell["response_slot"]) == {k % 3}
        assert set(cell["prompt_id"]) == set(partition_scheme(parted)["prompt_groups"][k // 3])
    assert list(partition_dataset(pool, 2, 3, seed=0)["partition"]) == list(parted["partition"])
    assert list(partition_dataset(pool, 2, 3, seed=1)["partition"]) != list(parted["partition"])
    uneven = partition_dataset(_pool(7, 4), 3, 2, seed=5)
    sizes = sorted(len(select_partition(uneven, k)) for k in range(6))
    assert sizes[-1] - sizes[0] <= 4 and sum(sizes) == 28  # groups of 3/2/2 prompts, 2 responses per slot


def test_partition_scheme_round_trips(tmp_path):
    parted = partition_dataset(_pool(5, 2), 2, 2, seed=7)
    scheme = partition_scheme(parted)
    assert {k: scheme[k] for k in ("num_prompt_groups", "num_response_slots", "seed", "num_partitions")} == \
        {"num_prompt_groups": 2, "num_response_slots": 2, "seed": 7, "num_partitions": 4}
    groups = scheme["prompt_groups"]
    assert set(groups) == {0, 1} and sorted(groups[0] + groups[1]) == list(range(5))
    assert abs(len(groups[0]) - len(groups[1])) <= 1
    parted.save_to_disk(str(tmp_path / "pool"))
    assert partition_scheme(Dataset.load_from_disk(str(tmp_path / "pool"))) == scheme
    assert partition_scheme(partition_dataset(parted, 1, 1))["num_partitions"] == 1  # re-partitioning replaces


@pytest.mark.parametrize("args, match", [
    ((_pool(3, 3), 4, 1), "exceeds the 3 prompts"),
    ((_pool(3, 2), 1, 3), "exceeds the 2 responses"),
    ((_pool(3, 2), 0, 1), "positive"),
    ((_pool(3, 2), 1, -1), "positive"),
    ((_pool(3, 2).remove_columns("response_slot"), 1, 1), "response_slot"),
    ((Dataset.from_list([{"x": 1}]), 1, 1), "prompt_id"),
    ((_pool(3, 2).select([]), 1, 1), "empty"),
])
def test_partition_errors(args, match):
    with pytest.raises(ValueError, match=match):
        partition_dataset(*args)


def test_select_partition_and_parse_scheme_errors():
    parted = partition_dataset(_pool(4, 2), 2, 2)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        select_partition(parted, 4)
    with pytest.raises(ValueError, match="partition_dataset"):
        select_partition(_pool(4, 2), 0)
    assert parse_scheme("2x3") == (2, 3) and parse_scheme(" 4×1 ") == (4, 1)
    for bad in ("2-3", "x3", "0x2", "2x", "axb", 23):
        with pytest.raises(ValueError, match="2x3"):
            parse_scheme(bad)


# ----------------------------------------------------------------------------- response pools

def test_rows_prompt_tokens_eos_and_left_padding(model, tokenizer):
    pool = generate_responses(model, tokenizer, PROMPTS, seed=0, **SETTINGS)
    assert len(pool) == len(PROMPTS) * 2
    assert list(pool["prompt_id"]) == [p for p in range(len(PROMPTS)) for _ in range(2)]
    assert list(pool["response_slot"]) == [0, 1] * len(PROMPTS)
    for row in pool:
        prompt = _ids(PROMPTS[row["prompt_id"]])  # batches mix prompt lengths: prompts were left-padded
        assert row["prompt"] == PROMPTS[row["prompt_id"]]
        assert row["prompt_length"] == len(prompt) and row["input_ids"][: len(prompt)] == prompt
        response = row["input_ids"][len(prompt):]
        assert 1 <= len(response) <= SETTINGS["max_new_tokens"]
        assert EOS_ID not in response[:-1]  # cut at the first EOS, nothing (no pad) after it
        assert response[-1] == EOS_ID or len(response) == SETTINGS["max_new_tokens"]
        assert row["response"] == tokenizer.decode(response, skip_special_tokens=True)
    assert any(r[-1] == EOS_ID for r in pool["input_ids"]), "no response ended with EOS; pick another seed"


def test_deterministic_and_seed_dependent(model, tokenizer):
    first = generate_responses(model, tokenizer, PROMPTS, seed=4, **SETTINGS)
    assert first.to_list() == generate_responses(model, tokenizer, PROMPTS, seed=4, **SETTINGS).to_list()
    other = generate_responses(model, tokenizer, PROMPTS, seed=5, **SETTINGS)
    assert list(first["input_ids"]) != list(other["input_ids"])
    from_dataset = generate_responses(model, tokenizer, Dataset.from_dict({"question": PROMPTS}), seed=4, **SETTINGS)
    assert from_dataset.to_list() == first.to_list()


def test_resume_regenerates_only_missing_batches(model, tokenizer, tmp_path, monkeypatch):
    reference = generate_responses(model, tokenizer, PROMPTS, seed=1, top_k_logprobs=3, **SETTINGS)
    out = str(tmp_path / "pool")
    calls = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(k["input_ids"].tolist()) or original(*a, **k))
    full = generate_responses(model, tokenizer, PROMPTS, seed=1, top_k_logprobs=3, output_dir=out, **SETTINGS)
    assert full.to_list() == reference.to_list() and len(calls) == 3
    shards = sorted(f for f in os.listdir(out) if f.startswith("shard-"))
    assert shards == ["shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    os.remove(os.path.join(out, shards[-1]))  # interrupted before the last batch finished
    calls.clear()
    resumed = generate_responses(model, tokenizer, PROMPTS, seed=1, top_k_logprobs=3, output_dir=out, **SETTINGS)
    assert calls == [[[1, 12, 13, 14], [0, 0, 1, 20]]]  # only the deleted (last, left-padded) batch ran again
    assert resumed.to_list() == reference.to_list()
    with open(os.path.join(out, SETTINGS_FILE)) as handle:
        settings = json.load(handle)
    assert settings["seed"] == 1 and settings["num_prompts"] == len(PROMPTS) and "output_dir" not in settings


@pytest.mark.parametrize("change, name", [({"seed": 2}, "seed"), ({"num_responses": 3}, "num_responses"),
                                          ({"temperature": 0.5}, "temperature"),
                                          ({"prompts": PROMPTS[:-1]}, "num_prompts")])
def test_resume_with_other_settings_is_refused(model, tokenizer, tmp_path, change, name):
    out = str(tmp_path / "pool")
    generate_responses(model, tokenizer, PROMPTS[:2], seed=1, output_dir=out, **{**SETTINGS, "batch_size": 8})
    arguments = {"prompts": PROMPTS[:2], "seed": 1, **SETTINGS, "batch_size": 8, **change}
    with pytest.raises(ValueError, match=name):
        generate_responses(model, tokenizer, output_dir=out, **arguments)


@pytest.mark.parametrize("build", [tiny_llama, _tiny_gpt2], ids=["llama", "gpt2"])
def test_teacher_topk_matches_float64_forward(build, tokenizer):
    k = 5
    pool = generate_responses(build(3), tokenizer, PROMPTS, seed=2, top_k_logprobs=k, **SETTINGS)
    reference = build(3).double()
    for row in pool:
        ids, start = row["input_ids"], row["prompt_length"]
        with torch.no_grad():
            logps = reference(torch.tensor([ids])).logits[0].log_softmax(-1)  # (L, V) float64, no padding
        expected = logps[start - 1: len(ids) - 1].topk(k, dim=-1)  # predicts response tokens 0..n-1
        topk_ids, topk_logps = torch.tensor(row["teacher_topk_ids"]), torch.tensor(row["teacher_topk_logps"])
        assert topk_ids.shape == (len(ids) - start, k)
        torch.testing.assert_close(topk_logps.double(), expected.values, atol=1e-4, rtol=0)
        assert torch.equal(topk_ids[:, 0], logps[start - 1: len(ids) - 1].argmax(-1))


def test_chat_template_path(model, tokenizer):
    tokenizer.chat_template = ("w1{% for m in messages %} {{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} w7{% endif %}")
    pool = generate_responses(model, tokenizer, ["w5 w9", "w4"], seed=0, **SETTINGS)
    assert pool[0]["input_ids"][:4] == [1, 5, 9, 7] and pool[0]["prompt_length"] == 4
    assert pool[2]["input_ids"][:3] == [1, 4, 7] and pool[2]["prompt_length"] == 3
    assert tokenizer.padding_side == "right"  # the caller's tokenizer is left as it was


def test_generate_responses_errors(model, tokenizer):
    with pytest.raises(ValueError, match="empty"):
        generate_responses(model, tokenizer, [], show_progress=False)
    with pytest.raises(ValueError, match="num_responses"):
        generate_responses(model, tokenizer, PROMPTS, num_responses=0, show_progress=False)
    with pytest.raises(ValueError, match="question"):
        generate_responses(model, tokenizer, Dataset.from_dict({"text": PROMPTS}), show_progress=False)
    with pytest.raises(TypeError, match="list of strings"):
        generate_responses(model, tokenizer, "w1 w2", show_progress=False)


# ----------------------------------------------------------------------------- questions

@pytest.mark.parametrize("task", sorted(REASONING_GYM_PRESETS))
def test_reasoning_gym_presets_count_and_determinism(task):
    questions = reasoning_gym_questions(task, 12, seed=3)
    assert len(questions) == 12 and all(set(q) == {"question", "answer", "task"} for q in questions)
    assert all(q["task"] == task and isinstance(q["answer"], str) for q in questions)
    assert questions == reasoning_gym_questions(task, 12, seed=3)
    assert questions != reasoning_gym_questions(task, 12, seed=training_seed(3))


@pytest.mark.parametrize("task, max_digits, operators", [("arith_basic", 1, "+-*/"), ("arith_chain_sum", 2, "+-"),
                                                         ("arith_add_mul", 2, "+*"),
                                                         ("arith_products", 2, "*")])
def test_arithmetic_presets_have_two_terms_of_the_right_size(task, max_digits, operators):
    for item in reasoning_gym_questions(task, 40, seed=0):
        expression = re.sub(r"^\D*?(?=[-(\d])", "", item["question"]).split("=")[0].split(". Give")[0].rstrip(".")
        terms = re.findall(r"-?\d+", expression)
        assert len(terms) == 2, item["question"]
        assert all(1 <= len(term.lstrip("-")) <= max_digits for term in terms), item["question"]
        assert set(re.findall(r"(?<=\s)[-+*/](?=\s)", expression)) <= set(operators), item["question"]
        assert str(eval(expression.replace("/", "//"))) == item["answer"], item["question"]


def test_seeds_and_unknown_preset():
    assert TRAIN_SEED_OFFSET == 1000 and training_seed(0) == 1000 and training_seed(5) == 1005
    with pytest.raises(ValueError, match="arith_products"):
        reasoning_gym_questions("arith_nope", 3, seed=0)


def test_gsm8k_local_jsonl(tmp_path):
    rows = [{"question": f"Q{i}: how many?", "answer": f"Work {i} <<{i}*2={2 * i}>>.\n#### {1000 * i:,}"}
            for i in range(6)]
    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    questions = gsm8k_questions(str(path))
    assert questions == [{"question": f"Q{i}: how many?", "answer": str(1000 * i)} for i in range(6)]
    sample = gsm8k_questions(str(path), limit=3, seed=1)
    assert len(sample) == 3 and sample == gsm8k_questions(str(path), limit=3, seed=1)
    assert all(q in questions for q in sample)
    with pytest.raises(FileNotFoundError, match="openai/gsm8k"):
        gsm8k_questions(str(tmp_path / "missing.jsonl"))
