"""Logit-lens probe: do intermediate layers' views of the final top-64 tokens add to the head's features?
Writes .bench-cache/lens_{tag}.npz per data set, then fits HistGB with/without the lens features."""
import json, os, sys, numpy as np, torch
from scipy.stats import spearmanr
from sklearn.ensemble import HistGradientBoostingRegressor
from hf_eu.trainers.eu_head_data import load_data
from hf_eu.embedded import load_embedded_target
torch.set_num_threads(1)
LAYERS = (10, 15, 20, 24, 26, 28, 29)
target, _ = load_embedded_target(); target.eval()
W = target.get_output_embeddings().weight.detach()
norm = target.model.norm

def lens(rows, answer_index, topk_ids, topk_logps, tag):
    path = f".bench-cache/lens_{tag}.npz"
    if os.path.exists(path):
        return np.load(path)["x"]
    out = np.zeros((len(answer_index), 3 * len(LAYERS)), dtype=np.float32)
    starts = np.r_[0, np.nonzero(np.diff(answer_index))[0] + 1, len(answer_index)]
    for s, e in zip(starts[:-1], starts[1:]):
        r = rows[answer_index[s]]; P, T = len(r["prompt_ids"]), len(r["answer_ids"])
        assert e - s == T, (tag, s, e, T)
        ids = torch.tensor([r["prompt_ids"] + r["answer_ids"]])
        with torch.no_grad():
            hs = target(ids, output_hidden_states=True).hidden_states
            top = torch.tensor(topk_ids[s:e]).long()  # (T, 64)
            final = torch.tensor(topk_logps[s:e]).float(); final = final - final.logsumexp(-1, keepdim=True)
            for j, l in enumerate(LAYERS):
                h = norm(hs[l][0, P - 1:P + T - 1])  # (T, H) positions predicting the answer tokens
                logits = torch.einsum("th,tkh->tk", h, W[top])  # (T, 64)
                logp = logits.log_softmax(-1)
                ent = -(logp.exp() * logp).sum(-1)
                kl = (final.exp() * (final - logp)).sum(-1)
                out[s:e, 3 * j:3 * j + 3] = torch.stack([ent, logp[:, 0], kl], -1).numpy()
        if s % 2000 < T: print(tag, s, len(answer_index), flush=True)
    np.savez(path, x=out)
    return out

folders = [".train-defaults/eu-head-data"] + [f".train-defaults/eu-head-data-{i}" for i in range(2, 8)]
X, Y, G = [], [], []
for k, f in enumerate(folders):
    d = load_data(f); rows = json.load(open(os.path.join(f, "answers.json")))
    X.append(np.c_[d["values"], d["topk_logps"][:, :8], lens(rows, d["answer_index"], d["topk_ids"], d["topk_logps"], f"train{k}")]); Y.append(d["ground_truth"])
X, Y = np.concatenate(X), np.concatenate(Y)
tests = {}
for name in ("arith", "gsm"):
    d = np.load(f".bench-cache/eval_feats_{name}.npz"); rows = json.load(open(f".bench-cache/small/{name}/answers.json"))
    tests[name] = (np.c_[d["values"], d["topk_logps"][:, :8], lens(rows, d["answer_index"], d["topk_ids"], d["topk_logps"], name)], d["ground_truth"], d["eu_head"])
base = X.shape[1] - 3 * len(LAYERS)
print("shipped head", {n: round(spearmanr(h, y)[0], 4) for n, (x, y, h) in tests.items()}, flush=True)
for label, cols in (("base", slice(0, base)), ("+lens", slice(0, None))):
    m = HistGradientBoostingRegressor(max_iter=400, learning_rate=0.05, random_state=0).fit(X[:, cols], np.log(Y + 1e-3))
    print(label, {n: round(spearmanr(m.predict(x[:, cols]), y)[0], 4) for n, (x, y, h) in tests.items()}, flush=True)
