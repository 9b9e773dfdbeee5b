"""usage: python benchmarks/probes/proxy_variants.py -> eu_head_proxy's Spearman/RMSE with cheaper proxy passes.

The shipped proxy head (trained on the float32 proxy's entropy) reads, on the evaluation's cached answers, the proxy's
entropy from: its float32 pass ("full32", what it was trained on), a bfloat16 copy ("full16"), and an answer-only
pass that continues the *target's* KV cache of the prompt instead of the proxy's own ("skip32", "skip16"). Prints
each with the proxy pass's seconds (one answer at a time) and writes `.bench-cache/proxy_variants.json`.
"""
import json, glob, copy, time, numpy as np, torch
from scipy.stats import spearmanr
from hf_eu import UncertaintyAwareModelForCausalLM
from hf_eu.defaults import DEFAULT_COMPOSITE_DIR
from hf_eu.embedded import load_embedded_target
from hf_eu.eu_head import with_proxy_entropy
from hf_eu.eu_features import TargetFeatures
torch.set_num_threads(1)
target, _ = load_embedded_target()
model = UncertaintyAwareModelForCausalLM.from_pretrained(DEFAULT_COMPOSITE_DIR, target=target, proxy_dtype="float32")
target = model.target
p32 = model.proxy.merge_and_unload() if hasattr(model.proxy, "merge_and_unload") else model.proxy
p16 = copy.deepcopy(p32).to(torch.bfloat16)  # a copy: shares nothing with the target
head = model.eu_head.proxy_head
def ent(logits):
    lp = torch.log_softmax(logits.float(), -1); return -(lp.exp() * lp).sum(-1)
out = {}
for name in ("arith", "gsm"):
    rows = json.load(open(f".bench-cache/small/{name}/answers.json"))
    scores = [dict(np.load(p)) for p in sorted(glob.glob(f".bench-cache/small/{name}/scores-*.npz"))]
    cached = np.concatenate([s["proxy_entropy"] for s in scores]); gt = np.concatenate([s["ground_truth"] for s in scores])
    cols = {"full32": [], "full16": [], "skip32": [], "skip16": []}
    t = {k: 0.0 for k in cols}
    with torch.no_grad():
        for r in rows:
            if not r["answer_ids"]:
                continue
            P, A = r["prompt_ids"], r["answer_ids"]
            ids = torch.tensor([P + A]); n = len(A)
            for k, m in (("full32", p32), ("full16", p16)):
                a = time.perf_counter(); cols[k].append(ent(m(input_ids=ids).logits[0, len(P) - 1:-1]).numpy()); t[k] += time.perf_counter() - a
            cache = target(input_ids=torch.tensor([P[:-1]]), use_cache=True).past_key_values
            for k, m in (("skip32", p32), ("skip16", p16)):
                c = copy.deepcopy(cache)
                if k == "skip16":
                    for layer in c.layers:
                        layer.keys, layer.values = layer.keys.to(torch.bfloat16), layer.values.to(torch.bfloat16)
                a = time.perf_counter()
                lg = m(input_ids=torch.tensor([[P[-1]] + A[:-1]]), past_key_values=c, use_cache=True).logits[0]
                cols[k].append(ent(lg).numpy()); t[k] += time.perf_counter() - a
    d = np.load(f".bench-cache/eval_feats_{name}.npz")
    f = TargetFeatures(torch.tensor(d["values"]), torch.tensor(d["topk_ids"]).long(), torch.tensor(d["topk_logps"]))
    res = {}
    for k, v in [("cached", cached)] + [(k, np.concatenate(v)) for k, v in cols.items()]:
        with torch.no_grad():
            eu = head(with_proxy_entropy(f, torch.tensor(v))).double().numpy()
        res[k] = dict(spearman=round(spearmanr(eu, gt)[0], 4), rmse=round(float(np.sqrt(np.mean((eu - gt) ** 2))), 4),
                      ent_spearman=round(spearmanr(v, gt)[0], 4), ent_mad_vs_cached=round(float(np.abs(v - cached).mean()), 4),
                      seconds=round(t.get(k, 0), 1))
        print(name, k, res[k], flush=True)
    np.savez(f".bench-cache/proxy_variants_{name}.npz", **{k: np.concatenate(v) for k, v in cols.items()})
    out[name] = res
json.dump(out, open(".bench-cache/proxy_variants.json", "w"), indent=1)
