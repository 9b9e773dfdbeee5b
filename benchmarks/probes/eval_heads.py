"""usage: python benchmarks/probes/eval_heads.py HEAD_DIR... -> Spearman/RMSE of each head (and their log-mean ensemble) on the eval's cached answers."""
import sys, numpy as np, torch
from scipy.stats import spearmanr
from hf_eu.eu_head import EUHead
from hf_eu.eu_features import TargetFeatures
from hf_eu.embedded import load_embedded_target
torch.set_num_threads(1)
target, _ = load_embedded_target()
heads = [EUHead.load(d).attach(target) for d in sys.argv[1:]]
for name in ("arith", "gsm"):
    d = np.load(f".bench-cache/eval_feats_{name}.npz")
    f = TargetFeatures(torch.tensor(d["values"]), torch.tensor(d["topk_ids"]).long(), torch.tensor(d["topk_logps"]))
    gt = d["ground_truth"]
    with torch.no_grad():
        logs = [h.log_eu(f).double().numpy() for h in heads]
    for i, l in enumerate(logs + ([np.mean(logs, 0)] if len(logs) > 1 else [])):
        p = np.exp(np.minimum(l, 20))
        tag = sys.argv[1 + i] if i < len(heads) else "ensemble"
        print(name, tag, "spearman", round(spearmanr(p, gt)[0], 4), "rmse", round(float(np.sqrt(np.mean((p - gt) ** 2))), 4),
              "| cached eu_head", round(spearmanr(d["eu_head"], gt)[0], 4) if i == 0 else "", flush=True)
