"""Feasibility probe: an OSD proxy with LoRA on the target's LAST 4 layers only (so at inference it could share the
target's first 26 layers' states). Train it (60 OSD steps, as stage 5, on eu-head-data-8's 96 answers, not in the
head's data), compute its entropy on the head's training answers and the eval answers, train a proxy head on it,
report eval Spearman beside the shipped eu_head_proxy (0.904/0.904). Caches in .bench-cache/suffix_*."""
import json, os, sys, numpy as np, torch
from scipy.stats import spearmanr
from datasets import Dataset
from peft import LoraConfig, get_peft_model, PeftModel
from hf_eu.embedded import load_embedded_target
from hf_eu.truncation import truncated_copy
from hf_eu import get_estimator, score_tokens_many
from hf_eu.eu_features import TargetFeatures
from hf_eu.eu_head import EUHead, PROXY_ENTROPY
from hf_eu.trainers.osd_config import OSDConfig
from hf_eu.trainers.osd_trainer import OSDTrainer
import hf_eu.trainers.run_eu_head as R
torch.set_num_threads(1)
FIRST = int(os.environ.get("SUFFIX_FIRST", 26))
work = f".scratch/suffix-proxy-{FIRST}"
target, tokenizer = load_embedded_target()
n = target.config.num_hidden_layers
modules = [f"model.layers.{l}.{part}" for l in range(FIRST, n) for part in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
if not os.path.isfile(os.path.join(work, "adapter_model.safetensors")):
    rows = json.load(open(".train-defaults/eu-head-data-8/answers.json"))
    data = Dataset.from_dict({"input_ids": [r["prompt_ids"] + r["answer_ids"] for r in rows],
                              "prompt_length": [len(r["prompt_ids"]) for r in rows]})
    base = truncated_copy(target, n)
    base.get_input_embeddings().requires_grad_(False); base.get_output_embeddings().requires_grad_(False)
    proxy = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=modules, lora_dropout=0.0))
    config = OSDConfig(output_dir=work, max_steps=60, per_device_train_batch_size=8, learning_rate=3e-4,
                       lr_scheduler_type="cosine", warmup_steps=6, logging_steps=5, save_strategy="no", report_to=[],
                       seed=0, data_seed=0, use_cpu=True, perturbation_rank=8, perturbation_sigma=0.1, perturbation_seed=0)
    trainer = OSDTrainer(model=proxy, args=config, train_dataset=data, teacher=target)
    trainer.train(); trainer.save_model(work)
    print("osd losses", [e["loss"] for e in trainer.state.log_history if "loss" in e], flush=True)
proxy = PeftModel.from_pretrained(truncated_copy(target, n), work).eval(); proxy.merge_adapter()

def column(rows, answer_index, tag):
    path = f".bench-cache/suffix{FIRST}_pe_{tag}.npz"
    stored = dict(np.load(path)) if os.path.isfile(path) else {}
    starts = np.r_[0, np.nonzero(np.diff(answer_index))[0] + 1]
    for s in starts:
        i = int(answer_index[s])
        if f"row_{i}" in stored: continue
        r = rows[i]; ids = torch.tensor([r["prompt_ids"] + r["answer_ids"]])
        with torch.no_grad():
            out = score_tokens_many([get_estimator("proxy_entropy")], ids, len(r["prompt_ids"]), drafts=[], proxy=proxy, target=target)
        stored[f"row_{i}"] = out["proxy_entropy"].epistemic_uncertainty[0].double().numpy()
        if len(stored) % 100 == 0:
            np.savez(path, **stored); print(tag, len(stored), flush=True)
    np.savez(path, **stored)
    return np.concatenate([stored[f"row_{int(answer_index[s])}"] for s in starts]).astype(np.float32)

folders = [".train-defaults/eu-head-data"] + [f".train-defaults/eu-head-data-{i}" for i in range(2, 8)]
R.proxy_entropy_column = lambda folder, t, p, answer_index: column(json.load(open(os.path.join(folder, "answers.json"))), answer_index, f"train{folders.index(folder)}")
evals = {}
for name in ("arith", "gsm"):
    d = np.load(f".bench-cache/eval_feats_{name}.npz")
    evals[name] = (d, column(json.load(open(f".bench-cache/small/{name}/answers.json")), d["answer_index"], name))
head = R.train_eu_head(*R.HfArgumentParser((R.EUHeadScriptArguments, R.EUHeadConfig)).parse_args_into_dataclasses([
    "--data_dir", *folders, "--num_train_epochs", "30", "--per_device_train_batch_size", "256", "--learning_rate", "3e-3",
    "--seed", "0", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1000", "--use_cpu", "--disable_tqdm", "True",
    "--output_dir", work + "-head"]), proxy=proxy)
shipped = EUHead.load("hf_eu/defaults/smollm2-135m-instruct/eu_head").attach(target)
for name, (d, pe) in evals.items():
    f = TargetFeatures(torch.tensor(np.c_[d["values"], pe]).float(), torch.tensor(d["topk_ids"]).long(), torch.tensor(d["topk_logps"]))
    gt = d["ground_truth"]
    with torch.no_grad():
        p = head(f).double().numpy()
    print(name, f"suffix-{FIRST} proxy head", round(spearmanr(p, gt)[0], 4), "rmse", round(float(np.sqrt(np.mean((p - gt) ** 2))), 4),
          "| suffix proxy entropy alone", round(spearmanr(pe, gt)[0], 4), flush=True)
