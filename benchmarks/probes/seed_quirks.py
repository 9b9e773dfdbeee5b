"""usage: python benchmarks/probes/seed_quirks.py -> how much of a label is one perturbation set's quirks.

Gradient boosting on the EU head's own features of the evaluation's cached answers (5 folds grouped by answer), fitted
to three labels of the same tokens: the 16-copy ground truth (seeds 0-15), TokUR M = 8 (10000-10007) and M = 4; each
scored against the ground truth (and the TokUR fit against TokUR). Needs `.bench-cache/eval_feats_{arith,gsm}.npz`
(step 1 of the README here) and the cached scores. A fit to one set of seeds scoring far better against that set
than against another means the labels carry that set's quirks: the reason the head trains on fresh seeds too.
"""
import numpy as np, glob, json
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.model_selection import GroupKFold
from scipy.stats import spearmanr
for name in ("arith", "gsm"):
    d = np.load(f".bench-cache/eval_feats_{name}.npz")
    s = [dict(np.load(p)) for p in sorted(glob.glob(f".bench-cache/small/{name}/scores-*.npz"))]
    tok8 = np.concatenate([x["tokur_m8"] for x in s]); tok4 = np.concatenate([x["tokur_m4"] for x in s])
    gt, g = d["ground_truth"], d["answer_index"]
    X = np.concatenate([d["values"], d["topk_logps"][:, :8]], 1)
    def cv(label):
        y = np.log(label + 1e-3); pred = np.zeros(len(X))
        for tr, te in GroupKFold(5).split(X, y, g):
            pred[te] = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, random_state=0).fit(X[tr], y[tr]).predict(X[te])
        return pred
    pg, p8, p4 = cv(gt), cv(tok8), cv(tok4)
    print(name, "GBM(label GT16) vs GT16", round(spearmanr(pg, gt)[0], 4), "| GBM(label tokur8) vs GT16", round(spearmanr(p8, gt)[0], 4),
          "vs tokur8", round(spearmanr(p8, tok8)[0], 4), "| GBM(label tokur4) vs GT16", round(spearmanr(p4, gt)[0], 4),
          "| tokur8 vs GT16", round(spearmanr(tok8, gt)[0], 4), "head cached with the features", round(spearmanr(d["eu_head"], gt)[0], 4))
