"""Step 5b of benchmarks/probes/README.md: the suffix proxy's entropy on training folders 6, 5, 4, 3 (run beside suffix_proxy.py)."""
import json, os, numpy as np, torch
from peft import PeftModel
from hf_eu.embedded import load_embedded_target
from hf_eu.truncation import truncated_copy
from hf_eu import get_estimator, score_tokens_many
from hf_eu.trainers.eu_head_data import load_data
torch.set_num_threads(1)
FIRST = 26; work = f".scratch/suffix-proxy-{FIRST}"
target, _ = load_embedded_target(); n = target.config.num_hidden_layers
proxy = PeftModel.from_pretrained(truncated_copy(target, n), work).eval(); proxy.merge_adapter()
folders = [".train-defaults/eu-head-data"] + [f".train-defaults/eu-head-data-{i}" for i in range(2, 8)]
for k in (6, 5, 4, 3):
    path = f".bench-cache/suffix{FIRST}_pe_train{k}.npz"
    if os.path.exists(path): continue
    rows = json.load(open(os.path.join(folders[k], "answers.json"))); ai = load_data(folders[k])["answer_index"]
    stored = {}
    for i in np.unique(ai):
        r = rows[int(i)]; ids = torch.tensor([r["prompt_ids"] + r["answer_ids"]])
        with torch.no_grad():
            out = score_tokens_many([get_estimator("proxy_entropy")], ids, len(r["prompt_ids"]), drafts=[], proxy=proxy, target=target)
        stored[f"row_{int(i)}"] = out["proxy_entropy"].epistemic_uncertainty[0].double().numpy()
    np.savez(path + ".tmp.npz", **stored); os.replace(path + ".tmp.npz", path); print("done", k, flush=True)
