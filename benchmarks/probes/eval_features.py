"""Teacher-forced EU-head features of the evaluation's cached answers, aligned with its cached scores."""
import json, os, glob, numpy as np, torch
from hf_eu.eu_features import teacher_forced_features
from hf_eu.embedded import load_embedded_target
torch.set_num_threads(1)
target, _ = load_embedded_target()
for name in ("arith", "gsm"):
    folder = f".bench-cache/small/{name}"
    rows = json.load(open(f"{folder}/answers.json"))
    scores = [dict(np.load(p)) for p in sorted(glob.glob(f"{folder}/scores-*.npz"))]
    gt = np.concatenate([s["ground_truth"] for s in scores]); eu = np.concatenate([s["eu_head"] for s in scores])
    feats, index = {"values": [], "topk_ids": [], "topk_logps": []}, []
    for i, r in enumerate(rows):
        if not r["answer_ids"]:
            continue
        ids = torch.tensor([r["prompt_ids"] + r["answer_ids"]])
        f = teacher_forced_features(target, ids, len(r["prompt_ids"]))
        for k in feats:
            feats[k].append(getattr(f, k)[0].numpy())
        index.append(np.full(len(r["answer_ids"]), i))
    out = {k: np.concatenate(v) for k, v in feats.items()}
    out.update(ground_truth=gt, eu_head=eu, answer_index=np.concatenate(index))
    assert len(gt) == len(out["values"]), (len(gt), len(out["values"]))
    np.savez(f".bench-cache/eval_feats_{name}.npz", **out)
    print(name, len(gt), flush=True)
