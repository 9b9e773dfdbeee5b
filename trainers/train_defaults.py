"""Train the default drafts and proxy for the embedded SmolLM2-135M-Instruct, which hf_eu ships.

Usage (what `make train-defaults` runs; about 30-40 minutes on 2 CPU cores, resumable):

    python -m trainers.train_defaults
    python -m trainers.train_defaults --ddd_steps 60 --osd_steps 120 --work_dir .train-defaults

Stages, each skipped on a rerun once finished (an interrupted trainer resumes from its checkpoint):
1. questions: reasoning-gym `gsm_symbolic` and the arithmetic presets, with training seeds (≥ 1000,
   never used by the evaluation), plus `openai/gsm8k` via `datasets.load_dataset` when `--gsm8k_path`
   is given (a hub id where a hub is reachable, or a local file of the same schema);
2. responses: R sampled answers per question from the target, with its top-k log-probs per token;
3. DDD: K drafts = LoRA adapters on the target's first layers, draft k trained on partition k only;
4. IDD (ablation, shipped separately): the same drafts all trained on partition 0;
5. OSD: the proxy, a LoRA adapter on all of the target's layers (so it starts at the target, which is
   already close to the BMA; a 4-layer proxy trained the same way ended farther from it than the raw target,
   a run whose figures are in no results file),
   trained on forward KL to a freshly perturbed target;
6. EU head: the target's greedy answers to their own training questions (seven folders: reasoning-gym seeds 2000,
   2100, 2200, …, 2600, each without the earlier folders' texts; `eu_head_more_sets`), their 16-copy
   ground-truth EU
   (perturbation seeds 20000+, apart from the evaluation's) and features (`trainers.eu_head_data`), then
   `EUHeadTrainer` (`trainers.run_eu_head`); it becomes the composite's default estimator `eu_head`; then its
   proxy head on the same data plus the stage-5 proxy's entropy (estimator `eu_head_proxy`; `--eu_head_proxy`);
7. the composite is saved to `hf_eu/defaults/smollm2-135m-instruct/` (adapters only: the base is
   rebuilt from the target) with `train_log.json`, `train_settings.json`, `train_questions.json` and
   `eu_head_questions.json` (the exact training texts, which the evaluation excludes) beside the weights.
   A calibrator, Gaussian student or answer-risk detector already in that folder (fitted by their own
   commands, see its config's `training`) is kept.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import HfArgumentParser

from hf_eu import UncertaintyAwareConfig, UncertaintyAwareModelForCausalLM, truncated_copy
from hf_eu.embedded import EMBEDDED_MODEL_ID, load_embedded_target
from .data import generate_responses
from .ddd_config import DDDConfig
from .ddd_trainer import DDDTrainer
from .osd_config import OSDConfig
from .osd_trainer import OSDTrainer
from .partition import parse_scheme, partition_dataset
from .questions import gsm8k_questions, reasoning_gym_questions, training_seed
from .script_utils import DEFAULT_LORA_MODULES


@dataclass
class DefaultsArguments:
    """Settings of the default composite's training (recorded in train_settings.json)."""

    work_dir: str = field(default=".train-defaults", metadata={"help": "Scratch folder (data, checkpoints)."})
    output_dir: str = field(default="hf_eu/defaults/smollm2-135m-instruct", metadata={"help": "Shipped composite."})
    idd_output_dir: str = field(default="hf_eu/defaults/smollm2-135m-instruct-idd",
                                metadata={"help": "IDD ablation drafts (identical data)."})
    gsm_questions: int = field(default=60, metadata={"help": "gsm_symbolic questions."})
    arith_questions_per_task: int = field(default=40, metadata={"help": "Questions per arithmetic preset."})
    gsm8k_path: str | None = field(default=None, metadata={"help": "openai/gsm8k id or a local file; None skips."})
    num_responses: int = field(default=3, metadata={"help": "Sampled responses per question (R)."})
    max_new_tokens: int = field(default=96, metadata={"help": "Longest sampled response."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of the responses."})
    top_k_logprobs: int = field(default=32, metadata={"help": "Stored teacher log-probs per token."})
    partition_scheme: str = field(default="3x1", metadata={"help": "DDD partition G×S (K = G·S drafts)."})
    draft_layers: int = field(default=4, metadata={"help": "Target layers under each draft."})
    proxy_layers: int | None = field(default=None, metadata={"help": "Target layers under the proxy (None: all of "
                                                                      "them, so it starts at the target itself)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of drafts and proxy."})
    proxy_dtype: str | None = field(default="bfloat16", metadata={
        "help": "dtype the composite runs its proxy in (config key proxy_dtype; the proxy trains in float32). "
                "bfloat16 halves its pass on CPUs with AVX512-BF16 and left eu_head_proxy's Spearman unchanged."})
    ddd_steps: int = field(default=60, metadata={"help": "Optimizer steps per draft."})
    osd_steps: int = field(default=60, metadata={"help": "Optimizer steps of the proxy."})
    osd_learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate of the proxy's adapter (it "
                                                                      "starts at the target, 0.15 nats from the BMA)."})
    batch_size: int = field(default=8, metadata={"help": "Rows per step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate (LoRA)."})
    perturbation_rank: int = field(default=8, metadata={"help": "OSD noise rank r."})
    perturbation_sigma: float = field(default=0.1, metadata={"help": "OSD noise scale σ."})
    seed: int = field(default=0, metadata={"help": "Base seed of sampling, partitions and training."})
    eu_head_questions: str = field(default="gsm_symbolic=72,arith_chain_sum=60,arith_products=60,arith_basic=60,"
                                           "arith_add_mul=30",
                                   metadata={"help": "EU-head training questions, preset=count,... ('' skips the stage)."})
    eu_head_more_sets: list[str] = field(default_factory=lambda: [
        "2100:gsm_symbolic=80,arith_chain_sum=50,arith_products=50,arith_basic=50,arith_add_mul=30",
        "2200:gsm_symbolic=120",
        "2300:arith_chain_sum=32,arith_products=32,arith_basic=32,arith_add_mul=32",
        "2400:gsm_symbolic=96",
        "2500:gsm_symbolic=96",
        "2600:gsm_symbolic=96"],
        metadata={"help": "More EU-head data folders, each 'SEED:preset=count,...' (a reasoning-gym seed ≥ 1000): "
                          "folder k + 1 holds none of the questions of folders 1 … k."})
    eu_head_proxy: bool = field(default=True, metadata={
        "help": "Also train the EU head's proxy head on the same data (estimator eu_head_proxy)."})
    eu_head_exclude: list[str] = field(default_factory=lambda: ["benchmarks/results/small/questions.json"],
                                       metadata={"help": "Question files the EU head must not train on (the evaluation's)."})
    eu_head_num_perturbed: int = field(default=16, metadata={"help": "Perturbed copies of the head's ground truth."})
    eu_head_seeds_per_batch: bool = field(default=False, metadata={
        "help": "Each batch of the head's data gets its own perturbations (folder k: seeds 20000 + 10000·k + "
                "batch·eu_head_num_perturbed …), so the head learns no one set's quirks (trainers.eu_head_data)."})
    eu_head_second_labels: int = field(default=4, metadata={
        "help": "Label the head's answers a second time with this many perturbed copies, drawn afresh for every batch "
                "(folder k: seeds 20000 + 10000·k + batch·copies …; folders `<folder>-varied<copies>` reuse the "
                "answers and features), and train on both label sets; 0: one set. Measured: Spearman 0.890 / 0.882 "
                "(arith / gsm) with the first labels only, 0.906 / 0.885 with both."})
    eu_head_epochs: float = field(default=15, metadata={"help": "Epochs of the EU head's training (15 over both "
                                                                "label sets: the steps of 30 over one)."})
    eu_head_max_new_tokens: int = field(default=128, metadata={"help": "Longest answer of the head's data."})


def _questions(args: DefaultsArguments) -> list[dict]:
    items = reasoning_gym_questions("gsm_symbolic", args.gsm_questions, seed=training_seed(0))
    for k, task in enumerate(("arith_basic", "arith_chain_sum", "arith_products"), start=1):
        items += reasoning_gym_questions(task, args.arith_questions_per_task, seed=training_seed(k))
    if args.gsm8k_path:
        items += gsm8k_questions(args.gsm8k_path, split="train", limit=args.gsm_questions, seed=args.seed)
    return items


def _student(target, args: DefaultsArguments, num_layers: int):
    base = truncated_copy(target, num_layers)
    base.get_input_embeddings().requires_grad_(False)
    base.get_output_embeddings().requires_grad_(False)
    config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=DEFAULT_LORA_MODULES,
                        lora_dropout=0.0)
    return get_peft_model(base, config)


def _common(args: DefaultsArguments, output_dir: str, steps: int, seed: int) -> dict:
    return dict(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
                logging_steps=5, save_steps=20, save_total_limit=1, report_to=[], seed=seed, data_seed=seed,
                use_cpu=True)


STAGE_RECORD = "hf_eu_stage.json"


def _stage(output_dir: str, run) -> dict:
    """Run a stage once: its record (seconds, losses) is saved in `output_dir` and returned on reruns."""
    path = os.path.join(output_dir, STAGE_RECORD)
    if os.path.isfile(path):
        with open(path) as handle:
            return json.load(handle)
    start = time.perf_counter()
    record = run()
    record["seconds"] = round(time.perf_counter() - start, 1)
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(record, handle, indent=2)
    return record


def _train(trainer, output_dir: str) -> dict:
    """Train (resuming from the last checkpoint in `output_dir` if any), save the adapter, return a log record."""
    has_checkpoint = os.path.isdir(output_dir) and any(n.startswith("checkpoint-") for n in os.listdir(output_dir))
    trainer.train(resume_from_checkpoint=has_checkpoint or None)
    trainer.save_model(output_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "log_history": trainer.state.log_history}


def _trained_student(target, num_layers: int, output_dir: str):
    """The adapter saved in `output_dir`, on the target's first `num_layers` layers."""
    return PeftModel.from_pretrained(truncated_copy(target, num_layers), output_dir).eval()


def _train_drafts(target, data: Dataset, args: DefaultsArguments, name: str, cells: list[int], log: dict) -> list:
    groups, slots = parse_scheme(args.partition_scheme)
    drafts = []
    for k, cell in enumerate(cells):
        output_dir = os.path.join(args.work_dir, name, f"draft_{k}")
        config = DDDConfig(**_common(args, output_dir, args.ddd_steps, args.seed + k), partition_index=cell,
                           num_prompt_groups=groups, num_response_slots=slots, partition_seed=args.seed)

        def run(config=config, output_dir=output_dir, k=k, cell=cell):
            print(f"[{name}] draft {k}: partition cell {cell}, {args.ddd_steps} steps", flush=True)
            draft = _student(target, args, args.draft_layers)
            return _train(DDDTrainer(model=draft, args=config, train_dataset=data), output_dir)

        log[f"{name}_draft_{k}"] = _stage(output_dir, run)
        drafts.append(_trained_student(target, args.draft_layers, output_dir))
    return drafts


def _rounded(loss: float | None) -> float | None:
    """A logged loss for the model card (None when a run was shorter than `logging_steps`)."""
    return None if loss is None else round(loss, 3)


def _seeded_set(spec: str) -> tuple[int, str]:
    """'SEED:preset=count,...' -> (seed, 'preset=count,...')."""
    seed, _, questions = spec.partition(":")
    if not seed.strip().isdigit() or not questions:
        raise ValueError(f"`eu_head_more_sets` entries are 'SEED:preset=count,...', got {spec!r}.")
    return int(seed), questions


def _eu_head_data_args(args: DefaultsArguments, data_dir: str) -> list:
    """The EU head's data folders: `data_dir`, then `data_dir-2` … for `eu_head_more_sets`; then, with
    `eu_head_second_labels`, each of them again with the second labels (same answers and features)."""
    if args.eu_head_second_labels and args.eu_head_seeds_per_batch:
        raise ValueError("`eu_head_second_labels` already draws fresh seeds per batch; combine it with one fixed "
                         "set of seeds for the first labels (`eu_head_seeds_per_batch` false), not both.")
    if args.eu_head_second_labels == 1 or args.eu_head_second_labels < 0:
        raise ValueError(f"`eu_head_second_labels` must be 0 (none) or ≥ 2 copies, got {args.eu_head_second_labels}.")
    from .eu_head_data import EUHeadDataArguments

    exclude = [path for path in args.eu_head_exclude if os.path.isfile(path)]
    common = dict(exclude_questions=exclude, batch_size=args.batch_size, num_perturbed=args.eu_head_num_perturbed,
                  max_new_tokens=args.eu_head_max_new_tokens, rank=args.perturbation_rank,
                  sigma=args.perturbation_sigma, seeds_per_batch=args.eu_head_seeds_per_batch)

    def own_range(number: int) -> int:  # folder `number`'s first seed where seeds vary per batch
        return 20000 + 10000 * number

    def first_seed(number: int) -> int:  # one fixed set (20000 …) unless the first labels vary per batch
        return own_range(number) if args.eu_head_seeds_per_batch else 20000

    data_args = [EUHeadDataArguments(output_dir=data_dir, questions_per_task=args.eu_head_questions,
                                     perturbation_seed_start=first_seed(1), **common)]
    for number, spec in enumerate(args.eu_head_more_sets, start=2):  # other seeds, none of the earlier questions
        seed, questions = _seeded_set(spec)
        earlier = [os.path.join(a.output_dir, "questions.json") for a in data_args]
        data_args.append(EUHeadDataArguments(output_dir=f"{data_dir}-{number}", questions_per_task=questions,
                                             question_seed=seed, perturbation_seed_start=first_seed(number),
                                             **dict(common, exclude_questions=exclude + earlier)))
    copies = args.eu_head_second_labels
    second = [replace(a, output_dir=f"{a.output_dir}-varied{copies}", num_perturbed=copies, seeds_per_batch=True,
                      perturbation_seed_start=own_range(number), answers_from=a.output_dir)
              for number, a in enumerate(data_args, start=1)] if copies else []
    return data_args + second


def _eu_head(target, args: DefaultsArguments, log: dict, proxy=None):
    """Stage 6: the EU head's data and training, then its proxy head (reading `proxy`'s entropy too, estimator
    `eu_head_proxy`) unless `eu_head_proxy` is off; None when skipped."""
    from .eu_head_config import EUHeadConfig
    from .eu_head_data import build_data
    from .run_eu_head import EUHeadScriptArguments, train_eu_head

    if not args.eu_head_questions:
        return None
    data_dir, output_dir = os.path.join(args.work_dir, "eu-head-data"), os.path.join(args.work_dir, "eu-head")
    data_args = _eu_head_data_args(args, data_dir)

    def head_config(folder: str) -> EUHeadConfig:
        return EUHeadConfig(output_dir=folder, num_train_epochs=args.eu_head_epochs, per_device_train_batch_size=256,
                            learning_rate=3e-3, seed=args.seed, report_to=[], save_strategy="no", logging_steps=50,
                            disable_tqdm=True, use_cpu=True)

    config = head_config(output_dir)
    heads = {}

    def run():
        began = time.perf_counter()
        for folder_args in data_args:
            build_data(folder_args)
        data_seconds = time.perf_counter() - began
        heads["head"] = train_eu_head(EUHeadScriptArguments(data_dir=[a.output_dir for a in data_args]), config)
        return {"data_seconds": round(data_seconds, 1), "tokens": heads["head"].info["tokens"]}

    log["eu_head"] = _stage(output_dir, run)
    from hf_eu.eu_head import EU_HEAD_FOLDER, EUHead

    if "head" not in heads:  # finished by an earlier run
        heads["head"] = EUHead.load(os.path.join(output_dir, EU_HEAD_FOLDER))
    if args.eu_head_proxy and proxy is not None:
        proxy_dir = output_dir + "-proxy"
        proxy_config = head_config(proxy_dir)

        def run_proxy():
            heads["proxy"] = train_eu_head(EUHeadScriptArguments(data_dir=[a.output_dir for a in data_args]),
                                           proxy_config, proxy=proxy)
            return {"tokens": heads["proxy"].info["tokens"]}

        log["eu_head_proxy"] = _stage(proxy_dir, run_proxy)
        heads["head"].set_proxy_head(heads.get("proxy") or EUHead.load(os.path.join(proxy_dir, EU_HEAD_FOLDER)))
    return heads["head"], [q for a in data_args for q in json.load(open(os.path.join(a.output_dir, "questions.json")))]


def _kept_parts(output_dir: str, target) -> dict:
    """The calibrator, student and detector a previous composite in `output_dir` holds (fitted by other commands)."""
    from hf_eu.configuration import load_composite_config
    from hf_eu.serialization import load_calibrator, load_detector, load_student

    if not os.path.isfile(os.path.join(output_dir, "config.json")):
        return {}
    config = load_composite_config(output_dir)
    return {"calibrator": load_calibrator(output_dir, config), "student": load_student(output_dir, config, target),
            "detector": load_detector(output_dir, config)}


def _save(target, drafts, proxy, output_dir: str, training: dict, args: DefaultsArguments, log: dict,
          questions: list[dict], eu_head=None) -> None:
    kept = _kept_parts(output_dir, target)
    config = UncertaintyAwareConfig(target_name_or_path=EMBEDDED_MODEL_ID, num_drafts=len(drafts),
                                    has_proxy=proxy is not None, training=training, adapter_storage_dtype="bfloat16",
                                    proxy_dtype=args.proxy_dtype,
                                    estimator="eu_head" if eu_head is not None else "hf_eu")
    UncertaintyAwareModelForCausalLM(target, drafts, proxy, config=config, eu_head=eu_head,
                                     **{k: v for k, v in kept.items() if v is not None}).save_pretrained(output_dir)
    with open(os.path.join(output_dir, "train_settings.json"), "w") as handle:
        json.dump(asdict(args), handle, indent=2)
    with open(os.path.join(output_dir, "train_log.json"), "w") as handle:
        json.dump(log, handle, indent=2)
    # Small task spaces (one-digit sums) repeat across seeds: the evaluation excludes these exact texts.
    with open(os.path.join(output_dir, "train_questions.json"), "w") as handle:
        json.dump(sorted({q["question"] for q in questions}), handle, indent=0)


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(DefaultsArguments).parse_args_into_dataclasses(args=argv)
    os.makedirs(args.work_dir, exist_ok=True)
    target, tokenizer = load_embedded_target()
    log: dict = {}

    # ------------------------------------------------------------ 1-2. data
    questions = _questions(args)
    responses_dir = os.path.join(args.work_dir, "responses")
    prompts = [q["question"] for q in questions]
    sampling = dict(num_responses=args.num_responses, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_k_logprobs=args.top_k_logprobs, seed=args.seed,
                    batch_size=args.batch_size, output_dir=responses_dir)
    sampled = {}

    def sample():
        sampled["responses"] = responses = generate_responses(target, tokenizer, prompts, **sampling)
        return {"questions": len(questions), "responses": len(responses), "response_tokens": int(sum(
            len(ids) - p for ids, p in zip(responses["input_ids"], responses["prompt_length"])))}

    log["data"] = _stage(responses_dir, sample)
    # a stage finished by an earlier run: read its shards (generate_responses resumes, generating nothing)
    responses = sampled.get("responses") or generate_responses(target, tokenizer, prompts, **sampling,
                                                               show_progress=False)
    groups, slots = parse_scheme(args.partition_scheme)
    data = partition_dataset(responses, groups, slots, seed=args.seed)

    # --------------------------------------------------------- 3-4. drafts
    ddd = _train_drafts(target, data, args, "ddd", list(range(groups * slots)), log)
    idd = _train_drafts(target, data, args, "idd", [0] * (groups * slots), log)

    # ---------------------------------------------------------------- 5. OSD
    proxy_layers = args.proxy_layers or target.config.num_hidden_layers
    output_dir = os.path.join(args.work_dir, f"osd-{proxy_layers}-layers")
    config = OSDConfig(**{**_common(args, output_dir, args.osd_steps, args.seed), "learning_rate": args.osd_learning_rate},
                       perturbation_rank=args.perturbation_rank,
                       perturbation_sigma=args.perturbation_sigma, perturbation_seed=args.seed)

    def distil():
        print(f"[osd] proxy on {proxy_layers} layers: {args.osd_steps} steps", flush=True)
        proxy = _student(target, args, proxy_layers)
        return _train(OSDTrainer(model=proxy, args=config, train_dataset=responses, teacher=target), output_dir)

    log["osd"] = _stage(output_dir, distil)
    proxy = _trained_student(target, proxy_layers, output_dir)

    # ------------------------------------------------------------ 6. EU head
    eu_head = _eu_head(target, args, log, proxy)

    # ----------------------------------------------------------- 7. composite
    # the from-scratch cost: every stage's own measured time, however many reruns it took to finish them
    log["train_seconds"] = round(sum(r["seconds"] for r in log.values() if isinstance(r, dict) and "seconds" in r), 1)
    training = {
        "data": f"{log['data']['questions']} questions (reasoning-gym gsm_symbolic + arithmetic, training seeds), "
                f"{args.num_responses} sampled responses each, top-{args.top_k_logprobs} teacher log-probs",
        "partition_scheme": args.partition_scheme,
        "drafts": f"LoRA r={args.lora_r} on the target's first {args.draft_layers} layers, {args.ddd_steps} steps each",
        "ddd_loss": "forward KL(target ‖ draft) on stored top-k",
        "ddd_last_losses": [_rounded(log[f"ddd_draft_{k}"]["last_loss"]) for k in range(len(ddd))],
        "proxy": f"LoRA r={args.lora_r} on the target's first {proxy_layers} layers, {args.osd_steps} OSD steps",
        "osd_noise": f"rank {args.perturbation_rank}, sigma {args.perturbation_sigma}, q_proj/v_proj, fresh per micro-batch",
        "osd_last_loss": _rounded(log["osd"]["last_loss"]),
        "train_seconds": log["train_seconds"],
    }
    if eu_head is not None:
        training["eu_head"] = (f"EUHead (q={eu_head[0].num_directions} Fisher directions, MLP {list(eu_head[0].hidden_sizes)}) "
                               f"on {eu_head[0].info['tokens']} answer tokens of {eu_head[0].info['answers']} answers, "
                               f"ground truth from {args.eu_head_num_perturbed} perturbed targets (seeds 20000+)"
                               + (f" and again from {args.eu_head_second_labels} drawn afresh per batch (seeds 30000+)"
                                  if args.eu_head_second_labels else "") + f"; {args.eu_head_epochs} epochs")
    _save(target, ddd, proxy, args.output_dir, training, args, log, questions, eu_head=eu_head and eu_head[0])
    if eu_head is not None:
        with open(os.path.join(args.output_dir, "eu_head_questions.json"), "w") as handle:
            json.dump(sorted({q["question"] for q in eu_head[1]}), handle, indent=0)
    _save(target, idd, None, args.idd_output_dir, {**training, "partition_scheme": "identical data (cell 0)"}, args, log,
          questions)
    print(f"saved {args.output_dir} and {args.idd_output_dir} in {log['train_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
