"""usage: python benchmarks/probes/proxy_int8.py -> the proxy under torch dynamic int8 quantization (every Linear, the
output head included): its forward time beside float32 and bfloat16 on 8 x 96 tokens, and eu_head_proxy reading its
entropy on the evaluation's cached answers (needs step 1's features). Measured: it destroys the entropy (0.46 / 0.39)."""
import json, glob, copy, time, warnings, numpy as np, torch
from scipy.stats import spearmanr
from hf_eu import UncertaintyAwareModelForCausalLM
from hf_eu.defaults import DEFAULT_COMPOSITE_DIR
from hf_eu.embedded import load_embedded_target
from hf_eu.eu_head import with_proxy_entropy
from hf_eu.eu_features import TargetFeatures
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
target, _ = load_embedded_target()
model = UncertaintyAwareModelForCausalLM.from_pretrained(DEFAULT_COMPOSITE_DIR, target=target, proxy_dtype="float32")
p32 = copy.deepcopy(model.proxy.merge_and_unload())
p16 = copy.deepcopy(p32).to(torch.bfloat16)
q8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(p32), {torch.nn.Linear}, dtype=torch.qint8)
ids = torch.randint(100, 40000, (8, 96))
with torch.no_grad():
    for m, n in ((p32, "fp32"), (p16, "bf16"), (q8, "int8")):
        m(input_ids=ids); s = []
        for _ in range(3):
            a = time.perf_counter(); m(input_ids=ids); s.append(time.perf_counter() - a)
        print("forward 8x96", n, round(min(s), 3), flush=True)
head = model.eu_head.proxy_head
def ent(logits):
    lp = torch.log_softmax(logits.float(), -1); return -(lp.exp() * lp).sum(-1)
for name in ("arith", "gsm"):
    rows = json.load(open(f".bench-cache/small/{name}/answers.json"))
    gt = np.concatenate([np.load(p)["ground_truth"] for p in sorted(glob.glob(f".bench-cache/small/{name}/scores-*.npz"))])
    col = []
    with torch.no_grad():
        for r in rows:
            if r["answer_ids"]:
                P = r["prompt_ids"]; col.append(ent(q8(input_ids=torch.tensor([P + r["answer_ids"]])).logits[0, len(P) - 1:-1]).numpy())
    v = np.concatenate(col)
    d = np.load(f".bench-cache/eval_feats_{name}.npz")
    f = TargetFeatures(torch.tensor(d["values"]), torch.tensor(d["topk_ids"]).long(), torch.tensor(d["topk_logps"]))
    with torch.no_grad():
        eu = head(with_proxy_entropy(f, torch.tensor(v))).double().numpy()
    print(name, "int8 head spearman", round(spearmanr(eu, gt)[0], 4), "rmse", round(float(np.sqrt(np.mean((eu - gt) ** 2))), 4),
          "entropy spearman", round(spearmanr(v, gt)[0], 4), flush=True)
