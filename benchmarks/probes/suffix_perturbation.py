"""usage: python benchmarks/probes/suffix_perturbation.py SET STARTS M -> the MI when only layers >= L are perturbed.

For each answer of SET (arith or gsm; cached answers of `benchmarks.run --scale small`), the mutual information of M
perturbed copies (seeds 30000+) where only the q/v layers from index L on (each L in the comma-separated STARTS)
carry the perturbation; prints its Spearman against the ground truth and writes `.bench-cache/suffix_pert_SET.npz`.
Measured: `python benchmarks/probes/suffix_perturbation.py gsm 26,20 4`.
"""
import json, glob, sys, numpy as np, torch
from scipy.stats import spearmanr
from hf_eu.embedded import load_embedded_target
from hf_eu.perturbation import LowRankGaussianPerturbation
from hf_eu.divergences import jsd
torch.set_num_threads(1)
name = sys.argv[1]; starts = [int(s) for s in sys.argv[2].split(",")]; M = int(sys.argv[3])
target, _ = load_embedded_target(); target.eval()
full = LowRankGaussianPerturbation(target, rank=8, sigma=0.1)
def layer_of(n): return int(n.split("layers.")[1].split(".")[0])
rows = json.load(open(f".bench-cache/small/{name}/answers.json"))
out = {L: [] for L in starts}
deltas = [full.deltas(30000 + m) for m in range(M)]  # each seed's updates, drawn once
with torch.no_grad():
    for i, r in enumerate(rows):
        if not r["answer_ids"]: continue
        P, A = r["prompt_ids"], r["answer_ids"]; ids = torch.tensor([P + A])
        for L in starts:
            lps = []
            for m in range(M):
                orig = {}
                for n, d in deltas[m].items():
                    if layer_of(n) >= L:
                        w = full.layers[n].weight; orig[n] = w.clone(); w.add_(d)
                lps.append(torch.log_softmax(target(input_ids=ids).logits[0, len(P) - 1:-1].float(), -1))
                for n, w0 in orig.items(): full.layers[n].weight.copy_(w0)
            out[L].append(jsd(torch.stack(lps), dim=0).double().numpy())
        if i % 10 == 0: print(i, flush=True)
np.savez(f".bench-cache/suffix_pert_{name}.npz", **{str(L): np.concatenate(v) for L, v in out.items()})
scores = [dict(np.load(p)) for p in sorted(glob.glob(f".bench-cache/small/{name}/scores-*.npz"))]
gt = np.concatenate([s["ground_truth"] for s in scores])
for L in starts: print(name, L, "spearman vs gt", spearmanr(np.concatenate(out[L]), gt)[0])
