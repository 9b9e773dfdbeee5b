"""Score prompt/answer pairs from a JSONL file with per-token EU: resumable, sharded over processes.

`score_jsonl(model, tokenizer, input_path, output_path)` is what `hf-eu score` runs:

1. It reads and checks every line first: a missing file, a line that is not a JSON object, or a row
   without the prompt/answer fields raises ValueError naming the line number before anything is scored.
2. Each process (accelerate's `PartialState`: process p of n; a single process without a launcher)
   takes the rows i with i % n == p that no part file holds yet and scores them teacher-forced, in
   batches (prompt tokens left-padded, answer tokens right-padded; only answer tokens are scored). Each
   finished batch is appended to the process's own part file `<output>.parts/process-<p>.jsonl`, one
   line per row with its input index, and flushed.
3. When every process is done, the main process merges the part files in input order into
   `output_path` (written aside, then renamed) and deletes the parts folder.

Interrupt it at any point and run the same command again: rows already in a part file are not
rescored, a line cut off mid-write is dropped and redone, and the output appears only once complete.
The parts folder records a fingerprint of the input file, the settings and the composite itself
(`hf_eu.fingerprint.model_fingerprint`: weights and config of target, drafts, proxy, …); resuming with
a different input, different settings or another model is refused, before anything is written,
instead of mixing results. A complete line of a part file that is not a scored row of this input
(damaged, or a row that does not match its input line) stops the run with the file and line named.
The output may not be the input itself (nor lie in the parts folder that `--overwrite` deletes).

Prompt and answer are tokenized separately (the prompt with the tokenizer's special tokens, or through
its chat template as one user message; the answer without special tokens) and concatenated as ids, so
the scored tokens are exactly the answer's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from ._atomic import atomic_output
from .aggregation import aggregate_uncertainty
from .fingerprint import model_fingerprint
from .viz import token_strings

__all__ = ["score_jsonl", "read_pairs", "parts_folder", "process_state", "check_paths"]

_FINGERPRINT_FILE = "fingerprint.json"


def parts_folder(output_path: str | os.PathLike) -> str:
    """The folder holding the part files of an unfinished run writing `output_path`."""
    return os.fspath(output_path) + ".parts"


def check_paths(input_path: str | os.PathLike, output_path: str | os.PathLike) -> None:
    """Refuse an output that is the input itself, or an input inside the output's parts folder.

    Either would destroy the input: the output replaces its file once complete, and `--overwrite`
    deletes the parts folder first.
    """
    source, out = os.path.realpath(os.fspath(input_path)), os.path.realpath(os.fspath(output_path))
    same = source == out or (os.path.exists(source) and os.path.exists(out) and os.path.samefile(source, out))
    if same:
        raise ValueError(f"--out {os.fspath(output_path)!r} is the input file itself: writing it would replace the "
                         "rows being scored. Choose another --out; nothing was scored.")
    parts = os.path.realpath(parts_folder(output_path))
    if source.startswith(parts.rstrip(os.sep) + os.sep):
        raise ValueError(f"The input {os.fspath(input_path)!r} lies in {parts!r}, the parts folder of --out, which "
                         "the run deletes; move the input or choose another --out. Nothing was scored.")


def read_pairs(path: str | os.PathLike, prompt_field: str = "prompt", answer_field: str = "answer") -> list[dict]:
    """Every non-blank line of `path` as a dict, after checking that each holds both fields as text.

    Raises:
        ValueError: the file is missing or unreadable, or a line is not a JSON object with non-empty
            string `prompt_field` and `answer_field` (the message names the line number and the fix).
    """
    return [row for _, row in _read_numbered(os.fspath(path), prompt_field, answer_field)]


def _read_numbered(path: str, prompt_field: str, answer_field: str) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line, checked as `read_pairs` describes."""
    if not os.path.isfile(path):
        raise ValueError(f"Input file {path!r} does not exist; pass the path of a JSONL file with one "
                         f'{{"{prompt_field}": ..., "{answer_field}": ...}} object per line.')
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"Cannot read {path!r} as UTF-8 text ({error}); check its permissions and encoding.") from error
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}): "
                             f"{line[:80]!r}. Fix or remove that line; nothing was scored.") from error
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__} "
                             f"{line[:80]!r}. Write one object per line; nothing was scored.")
        for field, option in ((prompt_field, "--prompt-field"), (answer_field, "--answer-field")):
            value = row.get(field)
            if not isinstance(value, str) or not value:
                found = "missing" if field not in row else f"{value!r}"
                raise ValueError(f"{path}, line {number}: field {field!r} must be a non-empty string, got {found} "
                                 f"(keys: {sorted(row)}). Fix the line, or name the right field with {option}; "
                                 "nothing was scored.")
        rows.append((number, row))
    if not rows:
        raise ValueError(f"{path!r} holds no rows; write one JSON object per line.")
    return rows


def process_state(force_cpu: bool = False):
    """accelerate's `PartialState` for this process: which of how many, and its device.

    Under `accelerate launch --multi_gpu --num_processes N` (or torchrun) it joins the process group:
    NCCL on GPUs, gloo CPU processes where no CUDA device exists or `force_cpu` is set. Without a
    launcher it is the only process.
    """
    from accelerate import PartialState

    return PartialState(cpu=force_cpu or not torch.cuda.is_available())


def _fingerprint(path: str, settings: dict[str, Any]) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"input_sha256": digest.hexdigest(), **settings}


def _check_fingerprint(folder: str, fingerprint: dict[str, Any]) -> None:
    """Record the run's fingerprint in a new parts folder; refuse a folder left by a different run."""
    path = os.path.join(folder, _FINGERPRINT_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            recorded = json.load(handle)
        if recorded != fingerprint:
            changed = sorted(k for k in set(recorded) | set(fingerprint) if recorded.get(k) != fingerprint.get(k))
            model = (" (weights_sha256: another composite, target or dtype scored those rows; resume with the same "
                     "--model, --target and --dtype)") if "weights_sha256" in changed else ""
            raise ValueError(f"{folder!r} holds parts of a run with a different {', '.join(changed)}{model}; resume "
                             "with the same input, settings and model, or delete that folder (or pass --overwrite) "
                             "to start over. Nothing was written.")
        return
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(fingerprint, handle, indent=1)


def _complete_lines(path: str) -> Iterator[str]:
    """Lines of a part file that were written completely (a line cut off mid-write has no newline)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.endswith("\n"):
                yield line


_SCORED_LISTS = ("tokens", "token_ids", "epistemic_uncertainty")


def _record_problem(record: Any, rows: list[dict] | None, fields: tuple[str, str]) -> str | None:
    """What is wrong with one part-file record (None if it is a scored row of this input)."""
    if not isinstance(record, dict) or not isinstance(record.get("row"), dict):
        return "not a record of the form {\"index\": ..., \"row\": {...}}"
    index, row = record.get("index"), record["row"]
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        return f"index {index!r} is not a row number"
    if rows is not None:
        if index >= len(rows):
            return f"index {index} is past the input's {len(rows)} rows"
        changed = [f for f in fields if row.get(f) != rows[index].get(f)]
        if changed:
            return f"its {', '.join(changed)} differ from input row {index}"
    lists = [row.get(name) for name in _SCORED_LISTS]
    if not all(isinstance(v, list) for v in lists) or len({len(v) for v in lists}) != 1 or not lists[0]:
        return f"row {index} lacks its scored tokens ({', '.join(_SCORED_LISTS)} of one non-zero length)"
    return None


def _read_parts(folder: str, rows: list[dict] | None = None, fields: tuple[str, str] = ("prompt", "answer")
                ) -> dict[int, dict]:
    """Every scored row in the part files, by input index; a damaged or foreign complete line is an error."""
    done: dict[int, dict] = {}
    if not os.path.isdir(folder):
        return done
    for name in sorted(os.listdir(folder)):
        if name.startswith("process-") and name.endswith(".jsonl"):
            path = os.path.join(folder, name)
            for number, line in enumerate(_complete_lines(path), start=1):
                try:
                    record = json.loads(line)
                    problem = _record_problem(record, rows, fields)
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    problem = f"not valid JSON ({error})"
                if problem is not None:
                    raise ValueError(f"Part file {path}, line {number}, is damaged: {problem}. Its rows cannot be "
                                     "trusted; delete that file (its rows are scored again) or pass --overwrite to "
                                     "start over. Nothing was written.")
                done.setdefault(record["index"], record["row"])
    return done


def _open_part(folder: str, process_index: int):
    """This process's part file for appending, cut back to its last complete line."""
    path = os.path.join(folder, f"process-{process_index}.jsonl")
    if os.path.exists(path):
        with open(path, "rb+") as handle:
            data = handle.read()
            handle.truncate(data.rfind(b"\n") + 1)  # drop a line an interruption cut off
    return open(path, "a", encoding="utf-8")


def _encode(tokenizer, prompt: str, answer: str, chat_template: bool, where: str) -> tuple[list[int], list[int]]:
    """Prompt ids and answer ids of one row; `where` ("file, line n") names it in errors."""
    if chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    for name, ids in (("prompt", prompt_ids), ("answer", answer_ids)):
        if not ids:
            raise ValueError(f"{where}: the {name} tokenizes to no token, so there is nothing to "
                             f"{'predict the answer from' if name == 'prompt' else 'score'}; give it some text. "
                             "Nothing was scored.")
    return list(prompt_ids), list(answer_ids)


def _score_batch(model, tokenizer, rows: list[dict], encoded: list[tuple[list[int], list[int]]],
                 estimator: str | None) -> list[dict]:
    """Teacher-forced EU of each row's answer tokens; the rows with the results added."""
    prompt_length = max(len(p) for p, _ in encoded)
    answer_length = max(len(a) for _, a in encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out: any id works
    input_ids = torch.full((len(rows), prompt_length + answer_length), pad_id, dtype=torch.long)  # (B, P + A)
    attention_mask = torch.zeros_like(input_ids)
    for b, (prompt_ids, answer_ids) in enumerate(encoded):
        start, end = prompt_length - len(prompt_ids), prompt_length + len(answer_ids)
        input_ids[b, start:end] = torch.tensor(prompt_ids + answer_ids)
        attention_mask[b, start:end] = 1
    out = model.estimate_uncertainty(input_ids.to(model.device), attention_mask.to(model.device),
                                     prompt_length=prompt_length, estimator=estimator)
    scored = []
    for b, (row, (_, answer_ids)) in enumerate(zip(rows, encoded)):
        n = len(answer_ids)
        values = {name: getattr(out, name) for name in ("epistemic_uncertainty", "eu_variance", "eu_bias")}
        eu = values["epistemic_uncertainty"][b : b + 1, :n]  # (1, n)
        scored.append({
            **row,
            "tokens": token_strings(tokenizer, answer_ids),
            "token_ids": answer_ids,
            **{name: None if v is None else v[b, :n].tolist() for name, v in values.items()},
            **{f"eu_{r}": aggregate_uncertainty(eu, None, r).item() for r in ("sum", "mean", "max")},
            "answer_risk": None if out.answer_risk is None else float(out.answer_risk[b]),
        })
    return scored


def _prepare_parts_folder(output_path: str, overwrite: bool, state, fingerprint: dict[str, Any]) -> str:
    """The parts folder of `output_path`, emptied first with `overwrite`, checked against `fingerprint`."""
    folder = parts_folder(output_path)
    if os.path.exists(output_path) and not overwrite:
        raise ValueError(f"Output {output_path!r} already exists; pass --overwrite (overwrite=True) to score again, "
                         "or choose another --out.")
    if overwrite and state.is_main_process and os.path.isdir(folder):
        shutil.rmtree(folder)
    state.wait_for_everyone()  # nobody reads the parts folder before the main process cleared it
    os.makedirs(folder, exist_ok=True)
    _check_fingerprint(folder, fingerprint)
    return folder


def _merge(folder: str, output_path: str, rows: list[dict], fields: tuple[str, str]) -> None:
    num_rows = len(rows)
    done = _read_parts(folder, rows, fields)
    missing = sorted(set(range(num_rows)) - set(done))
    if missing:
        raise RuntimeError(f"Rows {missing[:10]} of {num_rows} were not scored by any process; run the same "
                           "command again to score them.")
    with atomic_output(output_path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for index in range(num_rows):
            handle.write(json.dumps(done[index], ensure_ascii=False) + "\n")
    shutil.rmtree(folder)


def score_jsonl(model, tokenizer, input_path: str | os.PathLike, output_path: str | os.PathLike, *,
                prompt_field: str = "prompt", answer_field: str = "answer", batch_size: int = 8,
                estimator: str | None = None, chat_template: bool = False, overwrite: bool = False,
                progress: bool = True, state=None) -> dict[str, int]:
    """Write `output_path`: each input row plus its answer's per-token EU, in input order (module docstring).

    Args:
        model: an `UncertaintyAwareModelForCausalLM`.
        tokenizer: the target's tokenizer.
        input_path: JSONL, one object per line holding `prompt_field` and `answer_field`.
        output_path: JSONL written when every row is scored: the input row plus `tokens`, `token_ids`,
            `epistemic_uncertainty`, `eu_variance`, `eu_bias` (lists over the answer tokens, nats) and
            `eu_sum`, `eu_mean`, `eu_max`.
        batch_size: rows per teacher-forced pass.
        estimator: registered estimator name (default: the model's).
        chat_template: wrap each prompt in the tokenizer's chat template as a user message.
        overwrite: replace an existing output and discard part files of an earlier run.
        progress: show a progress bar (main process only).
        state: an `accelerate.PartialState` (default: `process_state()`: the launcher's processes, or one).

    Returns:
        `{"rows": total rows, "scored": rows this process scored now, "resumed": rows found already done}`.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer ≥ 1, got {batch_size!r}.")
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    check_paths(input_path, output_path)
    numbered = _read_numbered(input_path, prompt_field, answer_field)
    rows = [row for _, row in numbered]
    fields = (prompt_field, answer_field)
    state = state or process_state()
    settings = {"prompt_field": prompt_field, "answer_field": answer_field, "estimator": estimator or
                model.config.estimator, "chat_template": chat_template, "target": model.config.target_name_or_path,
                "weights_sha256": model_fingerprint(model)}
    folder = _prepare_parts_folder(output_path, overwrite, state, _fingerprint(input_path, settings))
    done = _read_parts(folder, rows, fields)
    mine = [i for i in range(state.process_index, len(rows), state.num_processes)]
    todo = [i for i in mine if i not in done]
    # Every process tokenizes every pending row, so a bad row stops all of them before any scoring.
    encoded = {i: _encode(tokenizer, rows[i][prompt_field], rows[i][answer_field], chat_template,
                          f"{input_path}, line {numbered[i][0]}") for i in range(len(rows)) if i not in done}
    with tqdm(total=len(mine), initial=len(mine) - len(todo), unit="row", disable=not (progress and
              state.is_main_process), desc=f"scoring (process {state.process_index + 1}/{state.num_processes})"
              ) as bar, _open_part(folder, state.process_index) as part, torch.no_grad():
        for start in range(0, len(todo), batch_size):
            indexes = todo[start : start + batch_size]
            scored = _score_batch(model, tokenizer, [rows[i] for i in indexes], [encoded[i] for i in indexes],
                                  estimator)
            part.writelines(json.dumps({"index": i, "row": row}, ensure_ascii=False) + "\n"
                            for i, row in zip(indexes, scored))
            part.flush()  # a finished batch survives an interruption (and, synced, a crash of the machine)
            os.fsync(part.fileno())
            bar.update(len(indexes))
    print(f"hf-eu score: process {state.process_index + 1}/{state.num_processes} scored {len(todo)} rows "
          f"({len(mine) - len(todo)} were already done)", file=sys.stderr)
    state.wait_for_everyone()
    if state.is_main_process:
        _merge(folder, output_path, rows, fields)
    state.wait_for_everyone()  # the output exists for every process once this returns
    return {"rows": len(rows), "scored": len(todo), "resumed": len(mine) - len(todo)}
