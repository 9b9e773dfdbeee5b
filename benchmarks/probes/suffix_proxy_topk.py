"""Can the suffix proxy's signal be read without its full lm_head? Per answer token: the proxy's logits on the
target's recorded top-64 tokens only -> restricted entropy and KL(target top-64 || proxy top-64) (renormalized).
Caches .bench-cache/suffix26_topk_{tag}.npz (x: (N, 2)); then trains a proxy-style head on values + these 2 columns."""
import json, os, sys, numpy as np, torch
from scipy.stats import spearmanr
from peft import PeftModel
from hf_eu.embedded import load_embedded_target
from hf_eu.truncation import truncated_copy
from hf_eu.eu_features import TargetFeatures
from hf_eu.eu_head import EUHead
import hf_eu.trainers.run_eu_head as R
torch.set_num_threads(1)
FIRST = 26; work = f".scratch/suffix-proxy-{FIRST}"
target, _ = load_embedded_target(); n = target.config.num_hidden_layers
proxy = PeftModel.from_pretrained(truncated_copy(target, n), work).eval(); proxy.merge_adapter()
W = proxy.get_output_embeddings().weight.detach()

def cols(rows, answer_index, topk_ids, topk_logps, tag):
    path = f".bench-cache/suffix{FIRST}_topk_{tag}.npz"
    if os.path.exists(path): return np.load(path)["x"]
    out = np.zeros((len(answer_index), 2), np.float32)
    starts = np.r_[0, np.nonzero(np.diff(answer_index))[0] + 1, len(answer_index)]
    for s, e in zip(starts[:-1], starts[1:]):
        r = rows[answer_index[s]]; P, T = len(r["prompt_ids"]), len(r["answer_ids"])
        ids = torch.tensor([r["prompt_ids"] + r["answer_ids"]])
        with torch.no_grad():
            h = proxy(ids, output_hidden_states=True).hidden_states[-1][0, P - 1:P + T - 1]  # (T, H), after the final norm
            top = torch.tensor(topk_ids[s:e]).long()
            logp = torch.einsum("th,tkh->tk", h.float(), W[top].float()).log_softmax(-1)  # (T, 64)
            final = torch.tensor(topk_logps[s:e]).float(); final = final - final.logsumexp(-1, keepdim=True)
            out[s:e, 0] = (-(logp.exp() * logp).sum(-1)).numpy()
            out[s:e, 1] = (final.exp() * (final - logp)).sum(-1).numpy()
    np.savez(path, x=out); print("done", tag, flush=True)
    return out

folders = [".train-defaults/eu-head-data"] + [f".train-defaults/eu-head-data-{i}" for i in range(2, 8)]
order = [int(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else list(range(7))
from hf_eu.trainers.eu_head_data import load_data
for k in order:
    d = load_data(folders[k]); cols(json.load(open(os.path.join(folders[k], "answers.json"))), d["answer_index"], d["topk_ids"], d["topk_logps"], f"train{k}")
if len(sys.argv) > 1: sys.exit(0)
evals = {}
for name in ("arith", "gsm"):
    d = np.load(f".bench-cache/eval_feats_{name}.npz")
    evals[name] = (d, cols(json.load(open(f".bench-cache/small/{name}/answers.json")), d["answer_index"], d["topk_ids"], d["topk_logps"], name))
orig_load, orig_names = R.load_data, R.feature_names
def load(folder, allow_partial=False):
    d = dict(orig_load(folder, allow_partial)); x = np.load(f".bench-cache/suffix{FIRST}_topk_train{folders.index(folder)}.npz")["x"]
    d["values"] = np.concatenate([d["values"], x], 1).astype(np.float32); return d
R.load_data = load
R.feature_names = lambda t: orig_names(t) + ["suffix_topk_entropy", "suffix_topk_kl"]
R.main(["--data_dir", *folders, "--num_train_epochs", "30", "--per_device_train_batch_size", "256", "--learning_rate", "3e-3",
        "--seed", "0", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1000", "--use_cpu", "--disable_tqdm", "True",
        "--output_dir", work + "-topk-head"])
head = EUHead.load(work + "-topk-head/eu_head").attach(target)
for name, (d, x) in evals.items():
    f = TargetFeatures(torch.tensor(np.c_[d["values"], x]).float(), torch.tensor(d["topk_ids"]).long(), torch.tensor(d["topk_logps"]))
    gt = d["ground_truth"]
    with torch.no_grad(): p = head(f).double().numpy()
    print(name, "suffix top-64 head", round(spearmanr(p, gt)[0], 4), "rmse", round(float(np.sqrt(np.mean((p - gt) ** 2))), 4),
          "| topk kl alone", round(spearmanr(x[:, 1], gt)[0], 4), flush=True)
