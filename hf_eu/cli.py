"""The `hf-eu` command line: generate with per-token EU, score JSONL files, run the training scripts.

    hf-eu generate "What is 7 * 8?"                      # answer with tokens coloured by EU (rich)
    hf-eu generate "What is 7 * 8?" --json --html eu.html --png eu.png
    hf-eu score pairs.jsonl --out scored.jsonl           # teacher-forced EU of given answers, resumable
    accelerate launch --multi_gpu --num_processes 2 -m hf_eu.cli score pairs.jsonl --out scored.jsonl
    hf-eu train ddd --dataset_path responses/ --output_dir d0 --partition_index 0 ...

Without `--model`, `generate` and `score` use the shipped SmolLM2-135M-Instruct composite
(`hf_eu.load_default()`). Errors in the input (a missing file, a malformed line, …) print one line
naming the value and the fix, and exit with status 1. `train` imports the `hf_eu.trainers` package (the
repository's `trainers/` folder) only when asked.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import textwrap
from typing import Any

from .aggregation import aggregate_uncertainty
from .viz import eu_colors, readable_ink, token_strings

__all__ = ["main", "build_parser"]

_TRAINERS = {
    "ddd": ("hf_eu.trainers.run_ddd", "train one Data-Diverse Draft on its partition of the target's responses"),
    "osd": ("hf_eu.trainers.run_osd", "train the OSD proxy against a freshly perturbed target"),
    "defaults": ("hf_eu.trainers.train_defaults", "rebuild the shipped default composite (hf_eu/defaults), resumable"),
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks (see `_paragraphs`) and shows the defaults that say something."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and not (action.default is None or action.default is False
                                          or action.default == argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _paragraphs(*texts: str) -> str:
    """Description text: each paragraph wrapped to 100 columns, a blank line between paragraphs."""
    return "\n\n".join(textwrap.fill(text, 100, break_on_hyphens=False) for text in texts)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="saved hf_eu composite (folder or hub id); default: the shipped "
                                       "SmolLM2-135M-Instruct composite from hf_eu.load_default()")
    group.add_argument("--target", help="with --model: load this target (id or folder) instead of the recorded one")
    group.add_argument("--tokenizer", help="tokenizer id or folder; default: the target's")
    group.add_argument("--estimator", help="registered estimator name (see hf_eu.list_estimators()); "
                                           "default: the composite's")
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype to load the target in")


def build_parser() -> argparse.ArgumentParser:
    """The `hf-eu` argument parser with its three subcommands."""
    parser = argparse.ArgumentParser(prog="hf-eu", description=__doc__, formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,score,train}")
    _add_generate_command(commands)
    _add_score_command(commands)
    _add_train_command(commands)
    return parser


def _add_generate_command(commands) -> None:
    generate = commands.add_parser(
        "generate", formatter_class=_HelpFormatter, help="answer a question, tokens coloured by epistemic uncertainty",
        description=_paragraphs("Answer QUESTION with the composite's target (its own `generate`) and show each "
                                "generated token coloured by its epistemic uncertainty (nats; darker = the model "
                                "knows less), then the answer's sum / mean / max EU."),
        epilog='example: hf-eu generate "What is 17 * 23?" --max-new-tokens 32 --html answer.html')
    generate.add_argument("question", help="the question or prompt text")
    _add_model_arguments(generate)
    options = generate.add_argument_group("generation")
    options.add_argument("--no-chat-template", action="store_true",
                         help="use QUESTION as raw text instead of a user message in the tokenizer's chat template")
    options.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate")
    options.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    options.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    options.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --do-sample)")
    options.add_argument("--seed", type=int, default=0, help="random seed (with --do-sample)")
    output = generate.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print one JSON object (answer, tokens, per-token EU, "
                                                            "sum/mean/max) instead of coloured text")
    output.add_argument("--html", metavar="PATH", help="also write a self-contained HTML heatmap of the answer")
    output.add_argument("--png", metavar="PATH", help="also write a PNG heatmap of the answer")
    generate.set_defaults(handler=_generate)


def _add_score_command(commands) -> None:
    score = commands.add_parser(
        "score", formatter_class=_HelpFormatter, help="teacher-forced per-token EU for prompt/answer pairs in a JSONL",
        description=_paragraphs(
            "Score given answers: for each line of INPUT (a JSON object with a prompt and an answer), the per-token "
            "EU of the answer's tokens given the prompt, by one teacher-forced pass of drafts and proxy. OUT gets "
            "every input row plus tokens, token_ids, epistemic_uncertainty, eu_variance, eu_bias and "
            "eu_sum/eu_mean/eu_max, in input order. A malformed line stops the run before anything is scored.",
            "Resumable: finished batches go to OUT.parts/; run the same command again after an interruption and "
            "only the missing rows are scored. OUT appears only once complete. Resuming with another input, other "
            "settings or another model (a hash of the composite's weights and config) is refused, as is an OUT that "
            "is the INPUT itself.",
            "Several processes: run it unchanged under `accelerate launch --multi_gpu --num_processes N -m hf_eu.cli "
            "score ...` (also on CPU-only machines, where the processes use gloo); process p scores rows p, p+N, ... "
            "and the main process merges them in input order."),
        epilog="example: hf-eu score pairs.jsonl --out scored.jsonl --prompt-field question --batch-size 16")
    score.add_argument("input", help="JSONL file, one object per line")
    score.add_argument("--out", required=True, help="JSONL file to write")
    _add_model_arguments(score)
    fields = score.add_argument_group("scoring")
    fields.add_argument("--prompt-field", default="prompt", help="name of the prompt field in each row")
    fields.add_argument("--answer-field", default="answer", help="name of the answer field in each row")
    fields.add_argument("--chat-template", action="store_true",
                        help="wrap each prompt in the tokenizer's chat template as a user message")
    fields.add_argument("--batch-size", type=int, default=8, help="rows per teacher-forced pass")
    fields.add_argument("--overwrite", action="store_true", help="replace OUT and discard parts of an earlier run")
    fields.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    fields.add_argument("--cpu", action="store_true", help="score on CPU even where a GPU exists (processes "
                                                           "launched with --multi_gpu then talk over gloo)")
    score.set_defaults(handler=_score)


def _add_train_command(commands) -> None:
    train = commands.add_parser(
        "train", formatter_class=_HelpFormatter, help="run a training script of the `hf_eu.trainers` package",
        description="Run one of the training scripts with the remaining arguments passed through unchanged:\n" +
                    "\n".join(f"  {name:9s} {module}: {about}" for name, (module, about) in _TRAINERS.items()) +
                    "\n\n" + _paragraphs("Each script's own options: hf-eu train METHOD --help. Several processes: "
                                         "accelerate launch --multi_gpu --num_processes N -m hf_eu.cli train METHOD "
                                         "... (on CPU add the script's --use_cpu True)."),
        epilog="example: hf-eu train osd --dataset_path responses/ --output_dir proxy --max_steps 100")
    train.add_argument("method", choices=sorted(_TRAINERS), help="which training script to run")
    train.add_argument("args", nargs=argparse.REMAINDER, help="arguments for that script (see its --help)")
    train.set_defaults(handler=_train)


def main(argv: list[str] | None = None) -> int:
    """Run `hf-eu` with `argv` (default: the command line); return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"hf-eu {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------- loading
def _load(args: argparse.Namespace):
    """The composite and its tokenizer from --model/--target/--tokenizer/--estimator/--dtype."""
    from transformers import AutoTokenizer

    from .defaults import load_default
    from .loading import is_composite
    from .modeling import UncertaintyAwareModelForCausalLM

    target_kwargs = {"dtype": args.dtype} if args.dtype else {}
    if args.model is None:
        if args.target:
            raise ValueError(f"--target {args.target!r} replaces the target of a composite given with --model; "
                             "pass --model too, or leave --target out to use the shipped default.")
        model, tokenizer = load_default(**target_kwargs)
    else:
        if not is_composite(args.model):
            raise ValueError(f"--model {args.model!r} is not a saved hf_eu composite (a folder or hub repo whose "
                             "config.json has model_type 'hf_eu'); save one with `model.save_pretrained(folder)`.")
        model = UncertaintyAwareModelForCausalLM.from_pretrained(args.model, target=args.target, **target_kwargs)
        tokenizer = None
    if args.estimator:
        from .estimators import get_estimator

        model.config.estimator = get_estimator(args.estimator).name
    source = args.tokenizer or (None if tokenizer is not None else args.target or model.config.target_name_or_path)
    if source is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise ValueError(f"Could not load a tokenizer from {source!r} ({error}); pass --tokenizer with the "
                             "target's tokenizer (id or folder).") from error
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------- generate
def _generate(args: argparse.Namespace) -> None:
    import torch
    from transformers import set_seed

    model, tokenizer = _load(args)
    prompt = args.question
    if not args.no_chat_template and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.question}], tokenize=False,
                                               add_generation_prompt=True)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if args.do_sample else {}
    set_seed(args.seed)
    with torch.no_grad():
        out = model.generate(**inputs.to(model.device), max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                             return_dict_in_generate=True, **sampling)
    record = _answer_record(tokenizer, args.question, prompt, out, inputs["input_ids"].shape[1])
    if args.html:
        from .viz import render_html

        render_html(record["tokens"], record["epistemic_uncertainty"], args.html, title=args.question)
        print(f"wrote {args.html}", file=sys.stderr)
    if args.png:
        from .viz import render_png

        print(f"wrote {render_png(record['tokens'], record['epistemic_uncertainty'], args.png, title=args.question)}",
              file=sys.stderr)
    if args.json:
        print(json.dumps(record, ensure_ascii=False))
    else:
        _print_coloured(record)


def _answer_record(tokenizer, question: str, prompt: str, out, prompt_length: int) -> dict[str, Any]:
    """The answer of row 0: text, tokens and their EU (real tokens only, up to and including EOS)."""
    mask = out.uncertainty_mask[0]
    token_ids = out.sequences[0, prompt_length:][mask].tolist()
    record: dict[str, Any] = {
        "question": question,
        "prompt": prompt,
        "answer": tokenizer.decode(token_ids, skip_special_tokens=True),
        "tokens": token_strings(tokenizer, token_ids),
        "token_ids": token_ids,
    }
    for name in ("epistemic_uncertainty", "eu_variance", "eu_bias"):
        values = getattr(out, name)
        record[name] = None if values is None else values[0][mask].tolist()
    for reduction in ("sum", "mean", "max"):
        record[f"eu_{reduction}"] = aggregate_uncertainty(out.epistemic_uncertainty[:1], mask[None], reduction).item()
    record["answer_risk"] = None if out.answer_risk is None else float(out.answer_risk[0])  # P(the answer is wrong)
    return record


def _print_coloured(record: dict[str, Any]) -> None:
    """Question, answer with each token's background coloured by EU (same scale as the heatmaps), summary."""
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False)
    values = record["epistemic_uncertainty"]
    answer = Text()
    for token, color in zip(record["tokens"], eu_colors(values)):
        answer.append(token, style=f"{readable_ink(color)} on {color}")
    high = max(values, default=0.0)
    scale = Text("scale: ")
    for color in eu_colors([high * i / 9 for i in range(10)], vmin=0.0, vmax=high or 1.0):
        scale.append("  ", style=f"on {color}")
    scale.append(f"  0 … {high:.3g} nats")
    console.print(Text("Q: ", style="bold") + Text(record["question"]))
    console.print(Text("A: ", style="bold") + answer)
    risk = "" if record.get("answer_risk") is None else f"; risk of a wrong answer {record['answer_risk']:.0%}"
    console.print(f"EU: sum {record['eu_sum']:.3f}  mean {record['eu_mean']:.3f}  max {record['eu_max']:.3f} nats "
                  f"over {len(values)} tokens{risk}")
    console.print(scale)


# ------------------------------------------------------------------------------------------------- score
def _score(args: argparse.Namespace) -> None:
    from .jsonl_scoring import check_paths, process_state, read_pairs, score_jsonl

    check_paths(args.input, args.out)  # --out X on input X would replace the input: refused before anything
    read_pairs(args.input, args.prompt_field, args.answer_field)  # a bad input fails before the model loads
    model, tokenizer = _load(args)
    state = process_state(force_cpu=args.cpu)
    if state.device.type != "cpu":
        model.to(state.device)
    summary = score_jsonl(model, tokenizer, args.input, args.out, prompt_field=args.prompt_field,
                          answer_field=args.answer_field, batch_size=args.batch_size, chat_template=args.chat_template,
                          overwrite=args.overwrite, progress=not args.no_progress, state=state)
    if state.is_main_process:
        print(f"wrote {summary['rows']} rows to {args.out}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------- train
def _train(args: argparse.Namespace) -> None:
    module_name = _TRAINERS[args.method][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name not in ("hf_eu.trainers", module_name):
            raise  # a dependency of the trainers is missing: its own message says which
        raise ValueError(f"`hf-eu train {args.method}` runs {module_name}, but the `hf_eu.trainers` package is not "
                         "importable here; install hf_eu (`pip install -e .` in a clone of the repository), or "
                         f"from the repository root run `python -m {module_name.removeprefix('hf_eu.')}`.") from error
    module.main(args.args)


if __name__ == "__main__":
    sys.exit(main())
