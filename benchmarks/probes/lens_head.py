"""Train an EU head whose values also hold the 21 logit-lens columns (.bench-cache/lens_*.npz), evaluate on the eval sets."""
import sys, json, numpy as np, torch
from scipy.stats import spearmanr
import hf_eu.trainers.run_eu_head as R
from hf_eu.eu_features import TargetFeatures
from hf_eu.eu_head import EUHead
torch.set_num_threads(1)
LAYERS = (10, 15, 20, 24, 26, 28, 29)
LENS = [f"lens_{k}:{l}" for l in LAYERS for k in ("entropy", "top1_logp", "kl")]
cols = slice(None) if len(sys.argv) < 3 else [int(c) for c in sys.argv[2].split(",")]
folders = [".train-defaults/eu-head-data"] + [f".train-defaults/eu-head-data-{i}" for i in range(2, 8)]
orig_load, orig_names = R.load_data, R.feature_names
def load(folder, allow_partial=False):
    d = dict(orig_load(folder, allow_partial)); x = np.load(f".bench-cache/lens_train{folders.index(folder)}.npz")["x"][:, cols]
    d["values"] = np.concatenate([d["values"], x], 1).astype(np.float32); return d
R.load_data = load
R.feature_names = lambda target: orig_names(target) + list(np.array(LENS)[cols])
out = sys.argv[1]
R.main(["--data_dir", *folders, "--num_train_epochs", "30", "--per_device_train_batch_size", "256", "--learning_rate", "3e-3",
        "--seed", "0", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1000", "--use_cpu", "--disable_tqdm", "True",
        "--output_dir", out])
from hf_eu.embedded import load_embedded_target
target, _ = load_embedded_target()
head = EUHead.load(out + "/eu_head").attach(target)
shipped = EUHead.load("hf_eu/defaults/smollm2-135m-instruct/eu_head").attach(target)
for name in ("arith", "gsm"):
    d = np.load(f".bench-cache/eval_feats_{name}.npz"); x = np.load(f".bench-cache/lens_{name}.npz")["x"][:, cols]
    f = TargetFeatures(torch.tensor(np.c_[d["values"], x]).float(), torch.tensor(d["topk_ids"]).long(), torch.tensor(d["topk_logps"]))
    f0 = TargetFeatures(torch.tensor(d["values"]).float(), torch.tensor(d["topk_ids"]).long(), torch.tensor(d["topk_logps"]))
    gt = d["ground_truth"]
    with torch.no_grad():
        p, p0 = head(f).double().numpy(), shipped(f0).double().numpy()
    print(name, "lens head", round(spearmanr(p, gt)[0], 4), "rmse", round(float(np.sqrt(np.mean((p - gt) ** 2))), 4),
          "| shipped", round(spearmanr(p0, gt)[0], 4), "rmse", round(float(np.sqrt(np.mean((p0 - gt) ** 2))), 4), flush=True)
