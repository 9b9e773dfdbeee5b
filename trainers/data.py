"""The training pool of Data-Diverse Drafts: the target answers each prompt R times, by sampling.

`generate_responses` returns one `datasets.Dataset` row per response (schema in its docstring),
optionally with the target's top-k log-probabilities at every response position (the forward-KL
distillation target). Prompts are processed in batches; batch b is sampled after
`torch.manual_seed(seed + b)`, so the rows do not depend on which batches ran in this process. With
`output_dir`, every finished batch is written atomically as `shard-{b:05d}.jsonl` beside
`generation_settings.json`, and a rerun loads those shards and generates only the missing batches:
an interrupted run resumes to exactly the rows an uninterrupted one yields. The settings record the
target by a hash of its weights and config (`hf_eu.fingerprint.model_fingerprint`, "weights_sha256"),
so resuming with another target (or other settings) is refused before anything is written; a shard
that does not hold exactly its batch's rows (damaged or edited) is refused, naming the file.

Causal shift, stated once: logits at position i predict token i + 1, so response token j (at position
`prompt_length + j` of the row) is predicted by the logits at position `prompt_length - 1 + j`.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os

import torch
from datasets import Dataset, Features, List, Value, concatenate_datasets
from tqdm.auto import tqdm

from hf_eu._atomic import atomic_output
from hf_eu.fingerprint import model_fingerprint

__all__ = ["generate_responses", "SETTINGS_FILE"]

SETTINGS_FILE = "generation_settings.json"


def _prompt_texts(prompts) -> list[str]:
    if isinstance(prompts, Dataset):
        column = next((c for c in ("question", "prompt") if c in prompts.column_names), None)
        if column is None:
            raise ValueError(f"`prompts` dataset has columns {prompts.column_names}; it needs a `question` "
                             "or `prompt` column.")
        prompts = list(prompts[column])
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("`prompts` must be a list of strings or a datasets.Dataset with a `question` column, "
                        f"got {type(prompts).__name__}.")
    if len(prompts) == 0:
        raise ValueError("`prompts` is empty; pass at least one prompt.")
    return list(prompts)


def _encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Prompt token ids without padding: chat template (user turn + generation prompt) when there is one."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                               tokenize=False) for t in texts]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(t)["input_ids"] for t in texts]


def _special_ids(target, tokenizer) -> tuple[set[int], int]:
    """(ids generation stops at, pad id)."""
    eos = getattr(target.generation_config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    pad = tokenizer.pad_token_id
    pad = getattr(target.generation_config, "pad_token_id", None) if pad is None else pad
    pad = min(eos_ids) if pad is None and eos_ids else pad
    if pad is None:
        raise ValueError("Neither the tokenizer nor the target's generation_config has a pad or EOS token; "
                         "set `tokenizer.pad_token`.")
    return eos_ids, pad


def _left_pad(id_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(id_lists), width), dtype=torch.long)  # (B, P)
    for row, ids in enumerate(id_lists):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
    return input_ids, mask


def _cut_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Response tokens up to and including the first EOS (all of them when there is none)."""
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: index + 1]
    return tokens


@torch.no_grad()
def _teacher_topk(target, sequences: torch.Tensor, mask: torch.Tensor, prompt_width: int,
                  lengths: list[int], k: int) -> list[tuple[list[list[int]], list[list[float]]]]:
    """Top-k (ids, log-probs) of the target's distribution predicting each kept response token.

    sequences, mask: (N, P + T), left-padded prompts of width P followed by the T generated tokens.
    """
    num_new = sequences.shape[1] - prompt_width
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # (N, P + T)
    kwargs = {}
    if "logits_to_keep" in inspect.signature(target.forward).parameters:
        kwargs["logits_to_keep"] = num_new + 1  # positions P - 1 .. P + T - 1
    device = target.device
    logits = target(input_ids=sequences.to(device), attention_mask=mask.to(device),
                    position_ids=position_ids.to(device), use_cache=False, **kwargs).logits
    logits = logits[:, -(num_new + 1):-1]  # (N, T, V): positions P - 1 .. P + T - 2
    result = []
    for row, length in enumerate(lengths):
        values, ids = logits[row, :length].float().log_softmax(-1).topk(k, dim=-1)  # (length, k)
        result.append((ids.tolist(), values.tolist()))
    return result


def _generate_batch(target, prompt_ids: list[list[int]], *, eos_ids: set[int], pad_id: int,
                    num_responses: int, max_new_tokens: int, temperature: float, top_p: float,
                    top_k_logprobs: int) -> list[dict]:
    """Rows (without prompt_id/prompt) of one prompt batch, prompt-major then response slot."""
    input_ids, mask = _left_pad(prompt_ids, pad_id)  # (B, P)
    device = target.device
    sequences = target.generate(
        input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=True,
        num_return_sequences=num_responses, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, top_k=0, pad_token_id=pad_id,
    ).cpu()  # (B * R, P + T), rows grouped by prompt
    width = input_ids.shape[1]
    responses = [_cut_at_eos(row[width:].tolist(), eos_ids) for row in sequences]
    rows = []
    for index, response in enumerate(responses):
        prompt = prompt_ids[index // num_responses]
        rows.append({"response_slot": index % num_responses, "input_ids": prompt + response,
                     "prompt_length": len(prompt), "response_ids": response})
    if top_k_logprobs > 0:
        full_mask = torch.zeros_like(sequences)  # (B * R, P + T)
        full_mask[:, :width] = mask.repeat_interleave(num_responses, dim=0)
        for index, response in enumerate(responses):
            full_mask[index, width: width + len(response)] = 1
        topk = _teacher_topk(target, sequences, full_mask, width, [len(r) for r in responses], top_k_logprobs)
        for row, (ids, logps) in zip(rows, topk):
            row["teacher_topk_ids"], row["teacher_topk_logps"] = ids, logps
    return rows


def _features(top_k_logprobs: int) -> Features:
    features = {"prompt_id": Value("int64"), "response_slot": Value("int64"), "prompt": Value("string"),
                "input_ids": List(Value("int32")), "prompt_length": Value("int64"), "response": Value("string")}
    if top_k_logprobs > 0:
        features["teacher_topk_ids"] = List(List(Value("int32")))
        features["teacher_topk_logps"] = List(List(Value("float32")))
    return Features(features)


def _atomic_write(path: str, text: str) -> None:
    with atomic_output(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)


def _shard_path(output_dir: str, batch_index: int) -> str:
    return os.path.join(output_dir, f"shard-{batch_index:05d}.jsonl")


def _prepare_output_dir(output_dir: str, settings: dict) -> None:
    """Create output_dir and record settings, or check that they match the recorded ones."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, SETTINGS_FILE)
    if not os.path.exists(path):
        if glob.glob(os.path.join(output_dir, "shard-*.jsonl")):
            raise ValueError(f"{output_dir!r} holds shards but no {SETTINGS_FILE}; use an empty output_dir.")
        _atomic_write(path, json.dumps(settings, indent=2, sort_keys=True))
        return
    with open(path, encoding="utf-8") as handle:
        recorded = json.load(handle)
    for key in sorted(set(recorded) | set(settings)):
        if recorded.get(key) != settings.get(key):
            if key == "weights_sha256":
                earlier = ("by an older version that did not record the target's fingerprint"
                           if recorded.get(key) is None else f"with another target (weights_sha256 {recorded[key][:12]}…)")
                raise ValueError(f"{output_dir!r} was generated {earlier}, but this call's target has weights_sha256 "
                                 f"{settings[key][:12]}…; mixing two targets' answers would be silently wrong. Resume "
                                 "with the recorded target (same weights, dtype and config) or use a new output_dir.")
            raise ValueError(f"{output_dir!r} was generated with {key}={recorded.get(key)!r} but this call has "
                             f"{key}={settings.get(key)!r}; resume with the recorded settings or use a new output_dir.")


def _settings(target, tokenizer, texts: list[str], prompt_ids: list[list[int]], **arguments) -> dict:
    """What `generation_settings.json` records: the arguments, with the prompts as a count and a hash of
    their text and token ids (so a changed chat template or tokenizer also counts as a change)."""
    digest = hashlib.sha256(json.dumps([texts, prompt_ids]).encode()).hexdigest()
    model_name = getattr(target, "name_or_path", None) or getattr(target.config, "_name_or_path", "")
    return {**arguments, "num_prompts": len(texts), "prompts_sha256": digest,
            "tokenizer": tokenizer.name_or_path, "model": model_name, "weights_sha256": model_fingerprint(target)}


def generate_responses(target, tokenizer, prompts, *, num_responses: int = 3, max_new_tokens: int = 128,
                       batch_size: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                       top_k_logprobs: int = 0, seed: int = 0, output_dir: str | None = None,
                       show_progress: bool = True) -> Dataset:
    """Sample `num_responses` answers per prompt from `target` (the DDD training pool).

    Args:
        target: a causal LM with `generate`; sampled with do_sample=True, top_k=0 (no top-k cut),
            `temperature` and `top_p`.
        tokenizer: its tokenizer; the chat template (one user turn + generation prompt) is applied
            when it has one, else the raw text is tokenized with its special tokens.
        prompts: list of strings, or a `datasets.Dataset` with a `question` (or `prompt`) column.
        num_responses: R >= 1 responses per prompt.
        batch_size: prompts per `generate` call (B * R sequences); part of the recorded settings.
        top_k_logprobs: k > 0 also stores the target's top-k log-probs at every response token
            (temperature 1, teacher-forced, float32 log-softmax).
        seed: batch b is sampled after `torch.manual_seed(seed + b)` (this sets torch's global RNG).
        output_dir: write/resume shards there (see the module docstring); None keeps all in memory.

    Returns:
        Dataset in prompt order, one row per response: `prompt_id` int64, `response_slot` int64 in
        [0, R), `prompt` str (as given), `input_ids` list[int32] (unpadded prompt tokens + response up
        to and including the first EOS), `prompt_length` int64, `response` str (special tokens
        skipped); with k > 0 also `teacher_topk_ids` list[list[int32]] and `teacher_topk_logps`
        list[list[float32]], both (len(input_ids) - prompt_length, k), sorted by decreasing log-prob.
    """
    texts = _prompt_texts(prompts)
    for name, value in (("num_responses", num_responses), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
    if not temperature > 0 or not 0 < top_p <= 1:
        raise ValueError(f"Sampling needs `temperature` > 0 and 0 < `top_p` <= 1, got {temperature} and {top_p}.")
    vocab_size = getattr(target.config, "vocab_size", None)
    if top_k_logprobs < 0 or (vocab_size and top_k_logprobs > vocab_size):
        raise ValueError(f"`top_k_logprobs` must be in [0, vocab size {vocab_size}], got {top_k_logprobs}.")
    prompt_ids = _encode_prompts(tokenizer, texts)
    eos_ids, pad_id = _special_ids(target, tokenizer)
    if output_dir is not None:
        _prepare_output_dir(output_dir, _settings(
            target, tokenizer, texts, prompt_ids, num_responses=num_responses, max_new_tokens=max_new_tokens,
            batch_size=batch_size, temperature=temperature, top_p=top_p, top_k_logprobs=top_k_logprobs, seed=seed))
    features = _features(top_k_logprobs)
    starts = list(range(0, len(texts), batch_size))
    parts = []
    was_training = target.training
    target.eval()
    try:
        for batch_index, start in enumerate(tqdm(starts, desc="generating responses", unit="batch",
                                                 disable=not show_progress)):
            rows = _batch_rows(target, tokenizer, texts, prompt_ids, batch_index, start, batch_size, output_dir,
                               eos_ids=eos_ids, pad_id=pad_id, num_responses=num_responses,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               top_k_logprobs=top_k_logprobs, seed=seed)
            parts.append(Dataset.from_list([{name: row[name] for name in features} for row in rows], features=features))
    finally:
        target.train(was_training)
    return concatenate_datasets(parts)


def _batch_rows(target, tokenizer, texts, prompt_ids, batch_index, start, batch_size, output_dir, *, seed,
                **generation) -> list[dict]:
    """The rows of one prompt batch: read from its shard when one exists, else generated (and written)."""
    path = _shard_path(output_dir, batch_index) if output_dir is not None else None
    if path is not None and os.path.exists(path):
        return _read_shard(path, texts, start, min(batch_size, len(texts) - start), generation["num_responses"],
                           generation["top_k_logprobs"])
    torch.manual_seed(seed + batch_index)
    batch = prompt_ids[start: start + batch_size]
    rows = _generate_batch(target, batch, **generation)
    return _finish_rows(tokenizer, texts, rows, start, generation["num_responses"], path)


def _read_shard(path: str, texts: list[str], start: int, num_prompts: int, num_responses: int,
                top_k_logprobs: int) -> list[dict]:
    """The rows of a shard, checked to be exactly its batch's: every (prompt, slot) once, in order."""
    def damaged(problem: str) -> ValueError:
        return ValueError(f"Shard {path} is damaged: {problem}. Delete it (its batch is generated again, to the same "
                          "rows) or use a new output_dir.")

    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise damaged(f"line {number} is not valid JSON ({error.msg})") from error
    expected = [(start + p, slot) for p in range(num_prompts) for slot in range(num_responses)]
    if len(rows) != len(expected):
        raise damaged(f"it holds {len(rows)} rows but its batch has {len(expected)} ({num_prompts} prompts x "
                      f"{num_responses} responses)")
    required = {"prompt_id", "response_slot", "prompt", "input_ids", "prompt_length", "response"}
    if top_k_logprobs > 0:
        required |= {"teacher_topk_ids", "teacher_topk_logps"}
    for number, (row, (prompt_id, slot)) in enumerate(zip(rows, expected), start=1):
        if not isinstance(row, dict) or required - set(row):
            missing = sorted(required - set(row)) if isinstance(row, dict) else "everything"
            raise damaged(f"row {number} lacks {missing}")
        if (row["prompt_id"], row["response_slot"]) != (prompt_id, slot) or row["prompt"] != texts[prompt_id]:
            raise damaged(f"row {number} is prompt {row['prompt_id']} slot {row['response_slot']}, expected prompt "
                          f"{prompt_id} ({texts[prompt_id][:40]!r}) slot {slot}")
    return rows


def _finish_rows(tokenizer, texts, rows, start, num_responses, path) -> list[dict]:
    """Add prompt_id, prompt and decoded response; write the shard atomically when `path` is set."""
    for index, row in enumerate(rows):
        prompt_id = start + index // num_responses
        row["prompt_id"], row["prompt"] = prompt_id, texts[prompt_id]
        row["response"] = tokenizer.decode(row.pop("response_ids"), skip_special_tokens=True)
    if path is not None:
        _atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))
    return rows
