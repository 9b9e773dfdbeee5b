"""Turn per-token values into `results.json`, a Markdown table laid out like the paper's, and plots.

Records (exact keys other code reads): `estimators` (one per estimator and set: `name`, `set`, `rmse`,
`pearson`, `spearman`, `auroc`, `auprc`, `prr`, `flops_ratio`, `time_ratio`, plus intervals and the other
aggregations), `detectors` (one per set and feature group: `set`, `features` = `confidence` or
`confidence+hf_eu`, `auroc_mean`, `auroc_std`), `command`, `machine`, `n_questions`, `target_accuracy`.
"""

from __future__ import annotations

import os

import numpy as np

from benchmarks.eval_metrics import (AGGREGATES, detection, detector_auroc, estimation_error, estimation_intervals,
                                     sequence_scores)

__all__ = ["build_results", "markdown_table", "make_plots", "AFFINE_BASELINES", "ABLATIONS"]

AFFINE_BASELINES = ("entropy", "max_prob", "neg_logprob", "proxy_entropy")  # not EU: compared after an affine fit
ABLATIONS = ("hf_eu_variance_only", "hf_eu_no_osd", "hf_eu_idd", "hf_eu_k2")
CHEAP = ("entropy", "max_prob", "neg_logprob")
_CONFIDENCE = [("neg_logprob", "sum"), ("neg_logprob", "mean"), ("neg_logprob", "max"), ("entropy", "mean"),
               ("entropy", "max"), ("max_prob", "mean"), ("max_prob", "max")]


def _flat(values: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(values) if values else np.zeros(0)


def estimator_record(name: str, set_name: str, scores: dict, calib: dict, wrong: np.ndarray, costs: dict,
                     bootstrap: int) -> dict:
    """One row of `estimators`: error against the ground truth, detection by the summed score, cost."""
    truth, estimate = _flat(scores["ground_truth"]), _flat(scores[name])
    fit = (_flat(calib[name]), _flat(calib["ground_truth"])) if name in AFFINE_BASELINES else None
    record = {"name": name, "set": set_name, **estimation_error(estimate, truth, fit), "rmse_affine": None}
    if name != "ground_truth" and fit is None:  # an affinely mapped baseline has no raw-nats interval
        record.update(estimation_intervals(scores[name], scores["ground_truth"], bootstrap=min(bootstrap, 300)))
    if name in calib:  # every estimator also after the affine map, for comparison
        record["rmse_affine"] = estimation_error(estimate, truth, (_flat(calib[name]), _flat(calib["ground_truth"])))["rmse"]
    record.update(detection(wrong, sequence_scores(scores[name], "sum"), bootstrap=bootstrap))
    for how in ("mean", "max"):
        record[f"auroc_{how}"] = detection(wrong, sequence_scores(scores[name], how), bootstrap=0)["auroc"]
    record.update(flops_ratio=costs["flops_ratio"].get(name), time_ratio=costs["time_ratio"].get(name))
    return record


def _features(scores: dict, pairs) -> np.ndarray:
    return np.stack([sequence_scores(scores[name], how) for name, how in pairs], axis=1)  # (answers, F)


def detector_records(set_name: str, scores: dict, wrong: np.ndarray, seeds: int) -> list[dict]:
    """Logistic-regression detectors on the target's confidence, without and with hf_eu's aggregated EU."""
    groups = {"confidence": _CONFIDENCE, "confidence+hf_eu": _CONFIDENCE + [("hf_eu", how) for how in AGGREGATES]}
    return [{"set": set_name, "features": group, **detector_auroc(_features(scores, pairs), wrong, seeds=seeds)}
            for group, pairs in groups.items()]


def _relative_reduction(records: list[dict], name: str, others: tuple[str, ...], set_name: str) -> dict | None:
    by_name = {r["name"]: r for r in records if r["set"] == set_name}
    pool = [(by_name[o]["rmse"], o) for o in others if o in by_name and by_name[o]["rmse"] is not None]
    if name not in by_name or not pool:
        return None
    best_rmse, best = min(pool)
    return {"best": best, "best_rmse": best_rmse, "rmse": by_name[name]["rmse"],
            "reduction": round(1 - by_name[name]["rmse"] / best_rmse, 4) if best_rmse else None}


def default_goals(records: list[dict], default: str, set_name: str) -> dict | None:
    """The EU-quality goals for the composite's default estimator on one set, measured (None where not evaluated)."""
    by_name = {r["name"]: r for r in records if r["set"] == set_name}
    if default not in by_name:
        return None
    row = by_name[default]
    ablation = _relative_reduction(records, default, ("hf_eu_variance_only", "hf_eu_no_osd", "hf_eu_idd"), set_name)
    tokur_m4 = by_name.get("tokur_m4", {}).get("rmse")
    return {"estimator": default, "spearman": row["spearman"], "spearman_ci": row.get("spearman_ci"),
            "rmse": row["rmse"], "rmse_ci": row.get("rmse_ci"), "tokur_m4_rmse": tokur_m4,
            "tokur_m8_spearman": by_name.get("tokur_m8", {}).get("spearman"),
            "rmse_vs_best_paper_ablation": ablation,
            "goal_spearman_0.90": None if row["spearman"] is None else row["spearman"] >= 0.90,
            "goal_rmse_le_tokur_m4": None if tokur_m4 is None or row["rmse"] is None else row["rmse"] <= tokur_m4,
            "goal_rmse_37pct_below_ablations": None if ablation is None or ablation["reduction"] is None
            else ablation["reduction"] >= 0.37}


def summary(records: list[dict], detectors: list[dict], sets: list[str]) -> dict:
    """The issue's goals, measured: RMSE reductions, AUROC gap to TokUR M = 8, what EU adds, cost vs TokUR."""
    out = {}
    for set_name in sets:
        by_name = {r["name"]: r for r in records if r["set"] == set_name}
        det = {d["features"]: d["auroc_mean"] for d in detectors if d["set"] == set_name}
        gap = (by_name["hf_eu"]["auroc"] - by_name["tokur_m8"]["auroc"]
               if by_name["hf_eu"]["auroc"] is not None and by_name["tokur_m8"]["auroc"] is not None else None)
        gain = (det["confidence+hf_eu"] - det["confidence"]
                if None not in (det.get("confidence"), det.get("confidence+hf_eu")) else None)
        cost = by_name["hf_eu"]["flops_ratio"] / by_name["tokur_m8"]["flops_ratio"]
        out[set_name] = {"rmse_vs_best_ablation": _relative_reduction(records, "hf_eu", ABLATIONS, set_name),
                         "rmse_vs_best_cheap_baseline": _relative_reduction(records, "hf_eu", CHEAP, set_name),
                         "calibrated_rmse_vs_best_ablation": _relative_reduction(records, "hf_eu_calibrated", ABLATIONS,
                                                                                 set_name),
                         "calibrated_rmse_vs_best_cheap_baseline": _relative_reduction(records, "hf_eu_calibrated",
                                                                                       CHEAP, set_name),
                         "time_vs_tokur_m8": (round(by_name["hf_eu"]["time_ratio"] / by_name["tokur_m8"]["time_ratio"], 4)
                                              if by_name["hf_eu"]["time_ratio"] and by_name["tokur_m8"]["time_ratio"]
                                              else None),
                         "auroc_minus_tokur_m8": None if gap is None else round(gap, 4),
                         "detector_gain_from_hf_eu": None if gain is None else round(gain, 4),
                         "flops_vs_tokur_m8": round(cost, 4)}
    return out


def build_results(sets: dict, calib: dict, names: list[str], costs: dict, bootstrap: int, cv_seeds: int,
                  default: str = "hf_eu") -> dict:
    """`sets[name] = {"scores": {...}, "wrong": (n,)}`; `calib` = the calibration set's scores; `default` = the
    composite's default estimator, whose goals `summary[set]["default_estimator"]` reports."""
    records, detectors = [], []
    for set_name, data in sets.items():
        for name in names + ["ground_truth"]:
            records.append(estimator_record(name, set_name, data["scores"], calib, data["wrong"], costs, bootstrap))
        detectors += detector_records(set_name, data["scores"], data["wrong"], cv_seeds)
    overview = summary(records, detectors, list(sets))
    for set_name in sets:
        overview[set_name]["default_estimator"] = default_goals(records, default, set_name)
    return {"estimators": records, "detectors": detectors, "summary": overview, "default_estimator": default}


def _cell(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _interval(values, digits: int) -> str:
    return "–" if not values or None in values else f"{values[0]:.{digits}f}–{values[1]:.{digits}f}"


def markdown_table(results: dict) -> str:
    """The paper's layout: per set, estimators as rows; RMSE/correlations, detection, cost as columns."""
    lines = [f"# Evaluation ({results['scale']})", "", f"Command: `{results['command']}`  ", f"Machine: {results['machine']}",
             ""]
    for set_name in results["n_questions"]:
        if set_name in ("calib", "detect"):  # fitting sets: no ground truth is evaluated on them
            continue
        lines += [f"## {set_name}: {results['n_questions'][set_name]} questions, {results['n_tokens'][set_name]} answer "
                  f"tokens, target accuracy {results['target_accuracy'][set_name]:.1%}", "",
                  "| estimator | RMSE ↓ | 95% CI | RMSE, affine ↓ | Pearson ↑ | Spearman ↑ | 95% CI | AUROC (sum) ↑ | 95% CI "
                  "| AUROC mean / max | AUPRC ↑ | PRR ↑ | FLOPs × | time × |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in [r for r in results["estimators"] if r["set"] == set_name]:
            affine = "*" if r["affine"] else ""
            ci = _interval(r.get("auroc_ci"), 2)
            lines.append(f"| {r['name']} | {_cell(r['rmse'], 4)}{affine} | {_interval(r.get('rmse_ci'), 4)} | "
                         f"{_cell(r['rmse_affine'], 4)} | {_cell(r['pearson'])} | {_cell(r['spearman'])} | "
                         f"{_interval(r.get('spearman_ci'), 3)} | {_cell(r['auroc'])} | {ci} | "
                         f"{_cell(r['auroc_mean'], 2)} / {_cell(r['auroc_max'], 2)} | {_cell(r['auprc'])} | {_cell(r['prr'])} | "
                         f"{_cell(r['flops_ratio'], 2)} | {_cell(r['time_ratio'], 2)} |")
        lines += ["", "| detector (logistic regression, CV) | AUROC mean ± std |", "|---|---|"]
        for d in [d for d in results["detectors"] if d["set"] == set_name]:
            lines.append(f"| {d['features']} | {_cell(d['auroc_mean'])} ± {_cell(d['auroc_std'])} |")
        lines.append("")
    lines += ["\\* RMSE after an affine map fitted on the calibration questions (the score is not in nats of EU); the "
              "'RMSE, affine' column applies that map to every estimator, to compare shapes rather than scales.",
              "FLOPs × and time ×: the estimator's teacher-forced scoring per answer token / plain target generation "
              "(eu_head's FLOPs and time are its teacher-forced fallback; inside `generate` it reads the decoding passes, "
              "see benchmarks/results/overhead.json). 95% CIs: bootstrap over questions.", ""]
    for set_name, record in (results.get("answer_risk") or {}).items():
        if not isinstance(record, dict) or "auroc" not in record:
            continue
        cv = record["cross_validated"]
        lines += [f"## answer_risk on {set_name} (detector fitted on the detect set, EU of `{record['detector_estimator']}`)",
                  "", "| AUROC ↑ | 95% CI | AUPRC ↑ | PRR ↑ | ECE ↓ | CV AUROC, confidence+length | CV AUROC, +EU | EU adds |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {_cell(record['auroc'])} | {_interval(record.get('auroc_ci'), 2)} | {_cell(record['auprc'])} | "
                  f"{_cell(record['prr'])} | {_cell(record['ece'])} | {_cell(cv['confidence_and_length']['auroc_mean'])} | "
                  f"{_cell(cv['with_eu']['auroc_mean'])} | {_cell(record.get('eu_adds_auroc'))} |", ""]
    for set_name, goals in results.get("summary", {}).items():
        default = goals.get("default_estimator") if isinstance(goals, dict) else None
        if default:
            lines.append(f"Default estimator `{default['estimator']}` on {set_name}: Spearman {_cell(default['spearman'])} "
                         f"({_interval(default['spearman_ci'], 3)}), goal ≥ 0.90 {'met' if default['goal_spearman_0.90'] else 'missed'}; "
                         f"RMSE {_cell(default['rmse'], 4)} vs TokUR M=4 {_cell(default['tokur_m4_rmse'], 4)} "
                         f"({'met' if default['goal_rmse_le_tokur_m4'] else 'missed'}); vs the best paper ablation "
                         f"{'met' if default['goal_rmse_37pct_below_ablations'] else 'missed'} (≥ 37% lower).")
    lines.append("")
    return "\n".join(lines)


def _frontier_plot(sets: dict, folder: str, names: list[str], plt, time_ratios: dict) -> str:
    """Spearman against the ground truth vs the time ratio of each estimator: the frontier of quality vs cost."""
    from scipy.stats import spearmanr

    path = os.path.join(folder, "frontier.png")
    figure, axis = plt.subplots(figsize=(7, 5))
    for marker, (set_name, data) in zip("os^", sets.items()):
        truth = _flat(data["scores"]["ground_truth"])
        for name in names:
            time_ratio = time_ratios.get(name)
            if time_ratio is None or np.std(_flat(data["scores"][name])) == 0:
                continue
            rho = spearmanr(_flat(data["scores"][name]), truth)[0]
            axis.scatter(time_ratio, rho, marker=marker, color="C0" if set_name == "arith" else "C1",
                         label=set_name if name == names[0] else None)
            axis.annotate(name, (time_ratio, rho), fontsize=7)
    axis.axhline(0.90, color="k", linestyle=":", linewidth=0.8)
    axis.set(xscale="log", xlabel="time ratio (teacher-forced scoring / plain generation)",
             ylabel="token-level Spearman vs ground truth", title="Quality vs cost of every estimator")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def make_plots(sets: dict, folder: str, tokenizer, names: list[str], time_ratios: dict | None = None,
               default: str = "hf_eu") -> list[str]:
    """ROC curves, EU estimate vs ground truth, the quality-cost frontier, and one answer coloured by the default
    estimator's EU; returns the file paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    from hf_eu.viz import render_html, render_png, token_strings

    paths = []
    shown = list(dict.fromkeys(n for n in (default, "hf_eu", "tokur_m8", "ground_truth", "hf_eu_calibrated",
                                           "gaussian_distill", "neg_logprob", "entropy") if n in names + ["ground_truth"]))
    figure, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 5), squeeze=False)
    for axis, (set_name, data) in zip(axes[0], sets.items()):
        if data["wrong"].min() != data["wrong"].max():
            for name in shown:
                fpr, tpr, _ = roc_curve(data["wrong"], sequence_scores(data["scores"][name], "sum"))
                axis.plot(fpr, tpr, label=name)
        axis.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        axis.set(title=f"{set_name}: detecting wrong answers", xlabel="false positive rate", ylabel="true positive rate")
        axis.legend(fontsize=8)
    paths.append(os.path.join(folder, "roc.png"))
    figure.tight_layout()
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    scattered = [n for n in dict.fromkeys((default, "hf_eu", "tokur_m8", "hf_eu_calibrated", "gaussian_distill", "hf_eu_no_osd")) if n in names]
    figure, axes = plt.subplots(1, len(scattered), figsize=(4.2 * len(scattered), 4), squeeze=False)
    for axis, name in zip(axes[0], scattered):
        truth = np.concatenate([_flat(d["scores"]["ground_truth"]) for d in sets.values()])
        estimate = np.concatenate([_flat(d["scores"][name]) for d in sets.values()])
        axis.scatter(truth, estimate, s=3, alpha=0.3)
        top = max(truth.max(), estimate.max(), 1e-6)
        axis.plot([0, top], [0, top], "k:", linewidth=0.8)
        axis.set(title=name, xlabel="ground-truth EU (16 perturbed targets)", ylabel="estimate (nats)")
    paths.append(os.path.join(folder, "eu_vs_ground_truth.png"))
    figure.tight_layout()
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    paths.append(_frontier_plot(sets, folder, names, plt, time_ratios or {}))
    set_name, data = next(iter(sets.items()))
    index = int(np.argmax([len(v) for v in data["scores"][default]][:20]))
    tokens = token_strings(tokenizer, data["answers"][index]["answer_ids"].tolist())
    title = f"{default} EU per token, {set_name} question {index} ({'right' if not data['wrong'][index] else 'wrong'})"
    paths.append(os.path.join(folder, "answer_heatmap.png"))
    render_png(tokens, data["scores"][default][index], paths[-1], title=title)
    render_html(tokens, data["scores"][default][index], os.path.join(folder, "answer_heatmap.html"), title=title)
    return paths
