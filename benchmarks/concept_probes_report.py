"""Render benchmarks/results/concept_probes.md from concept_probes.json."""

from __future__ import annotations

from pathlib import Path

GOAL_XSTEST = 0.90


def _ci(pair) -> str:
    return f" [{pair[0]:.3f}, {pair[1]:.3f}]" if pair else ""


def _rate(m: dict, key: str) -> str:
    return f"{m[key]:.3f}{_ci(m.get(key + '_ci95'))}" if m.get(key) is not None else ""


def render(report: dict, results: Path) -> None:
    lines = ["# Concept probes: toxicity, hazardous cyber knowledge, harm by held-out source, XSTest twins (issue 34)", "",
             f"Command: `{report['command']}` (model {report['model']}, fingerprint {report['model_fingerprint']}); {report['machine']}; "
             f"{report['seconds']:.0f} s ({report['extraction_seconds']:.0f} s of model forwards; the rest cached).", "",
             "Label 1 = the concept is present. Logistic probes on the residual stream (`layers.N` = entering block N) of each text "
             "rendered as one user turn, as the service scores requests; layer and pooling chosen on dev splits; the threshold is set "
             "so that each benign calibration set (held-out negatives of the concept's own data AND 500 held-out Alpaca requests) sees "
             "at most 1% false positives; then measured on sets never used before. Intervals: 95% (AUROC: bootstrap; rates: Wilson). "
             f"Goals (issue 34): AUROC >= 0.95 out of distribution per concept, XSTest test half >= 0.90.", "",
             "## Concepts", "",
             "| concept | layer / pooling | AUROC in distribution (n) | AUROC OOD | OOD set | TPR at threshold, OOD | FPR at threshold, OOD | n OOD (pos+neg) | FPR on Alpaca test | goal met |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["concepts"]:
        alpaca = row.get("alpaca_fpr")
        alpaca_text = f"{alpaca['rate']:.3f}{_ci(alpaca['ci95'])} (n {alpaca['n']})" if alpaca else ""
        lines.append(f"| {row['concept']} | {row['layer']} / {row['pooling']} | {row['auroc_in']:.3f}{_ci(row['auroc_in_ci95'])} ({row['n_in']}) | "
                     f"{row['auroc_ood']:.3f}{_ci(row.get('auroc_ood_ci95'))} | {row['ood_set']} | {row['tpr_at_1pct_fpr_ood']:.3f}{_ci(row.get('tpr_ood_ci95'))} | "
                     f"{row['fpr_measured_ood']:.3f}{_ci(row.get('fpr_ood_ci95'))} | {row['n_ood_positive']}+{row['n_ood_negative']} | {alpaca_text} | "
                     f"{'yes' if row['goal_auroc_ood_met'] else 'no'} |")
    tox = report.get("toxicity")
    if tox:
        lines += ["", "## Toxicity", "", f"Train: {tox['train']}. In distribution: {tox['in_distribution']}. Saved: `{tox['folder']}`.", "",
                  "Davidson tweets by class (rate flagged at the threshold):", "",
                  "| Davidson class | flagged | n | 95% CI |", "| --- | --- | --- | --- |"]
        for name, r in tox["davidson_by_class_tpr"].items():
            lines.append(f"| {name} | {r['rate']:.3f} | {r['n']} | {_ci(r['ci95'])} |")
        head = tox["kaggle_head"]
        lines += ["", f"Sub-labels: the Jigsaw file with the six Kaggle sub-labels is 267 rows (27 toxic), too few to train per-sub-label "
                  f"probes; the toxicity probe on it: AUROC {head['auroc']:.3f}{_ci(head['auroc_ci95'])} ({head['n_harmful']}+{head['n_benign']}), "
                  f"FPR at threshold {_rate(head, 'fpr_at_threshold')}. Flagged per sub-label:", "",
                  "| sub-label | flagged | n | 95% CI |", "| --- | --- | --- | --- |"]
        for name, r in tox["kaggle_head_sublabel_tpr"].items():
            lines.append(f"| {name} | {r['rate']:.3f} | {r['n']} | {_ci(r['ci95'])} |")
    cyber = report.get("cyber")
    if cyber:
        lc = cyber["length_control"]
        band = lc["probe_in_band"]
        lines += ["", "## Hazardous cyber knowledge", "", f"Train: {cyber['train']}. In distribution: {cyber['in_distribution']}. "
                  f"Saved: `{cyber['folder']}`.", "",
                  f"Length confound (WMDP stems are long, often code): text length alone reaches AUROC {lc['length_only_auroc_ood']:.3f} on "
                  f"the OOD set. Within {lc['length_band_chars'][0]}-{lc['length_band_chars'][1]} characters ({band['n_harmful']} WMDP + "
                  f"{band['n_benign']} MMLU), length alone gives {lc['length_only_auroc_in_band']:.3f} and the probe "
                  f"{band['auroc']:.3f}{_ci(band['auroc_ci95'])}, TPR at threshold {_rate(band, 'tpr_at_threshold')}, FPR "
                  f"{_rate(band, 'fpr_at_threshold')}."]
    loso = report.get("harm_loso")
    if loso:
        allp = loso["all_sources_probe"]
        lines += ["", "## Harm, leave one source out", "", "Each fold trains on every other source (60% of each, 20% for choosing "
                  "layer and pooling) plus 800 Alpaca requests, calibrates on 500 Alpaca requests, and is measured on the whole held-out "
                  "source (against its own benign prompts when it has them, else 400 Alpaca test requests).", "",
                  "| held-out source | harmful / benign prompts | probe chosen | AUROC | TPR at threshold | FPR at threshold | negatives |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, f in loso["folds"].items():
            lines.append(f"| {name} | {f['n_harmful']} / {f['n_benign']} | {f['probe']} | {f['auroc']:.3f}{_ci(f['auroc_ci95'])} | "
                         f"{_rate(f, 'tpr_at_threshold')} | {_rate(f, 'fpr_at_threshold')} | {f['negatives']} |")
        m = allp["in"]
        lines += ["", f"All sources together ({allp['probe']}, saved `{allp['folder']}`): on the 20% test parts of every source "
                  f"AUROC {m['auroc']:.3f}{_ci(m['auroc_ci95'])}, TPR at threshold {_rate(m, 'tpr_at_threshold')}, FPR "
                  f"{_rate(m, 'fpr_at_threshold')} (n {m['n_harmful']}+{m['n_benign']}). Not used: {loso['not_used']}."]
    token = report.get("token_level")
    if token:
        lines += ["", "## Token-level toxicity probes from comment labels", "",
                  f"All at layers.{token['layer']}, trained on {token['n_train']}; calibrated like the pooled probe. Per-token "
                  f"scores of the MIL probe on 10 test comments: [{Path(token['html']).name}]({Path(token['html']).name}). Saved: "
                  f"`{token['folder']}`.", "",
                  "| method | dev AUROC | AUROC Jigsaw test | AUROC Davidson (OOD) | TPR at threshold, OOD | FPR at threshold, OOD |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, r in token["rows"].items():
            o = r["ood_davidson"]
            lines.append(f"| {name} | {r['dev_auroc']:.3f} | {r['in']['auroc']:.3f}{_ci(r['in']['auroc_ci95'])} | "
                         f"{o['auroc']:.3f}{_ci(o['auroc_ci95'])} | {_rate(o, 'tpr_at_threshold')} | {_rate(o, 'fpr_at_threshold')} |")
    xs = report.get("xstest")
    if xs:
        lines += ["", "## XSTest: safe lexical twins", "", f"Method: {xs['method']}.", "",
                  "| | probe | AUROC, XSTest test half | TPR at threshold | FPR at threshold (safe twins flagged) |",
                  "| --- | --- | --- | --- | --- |"]
        for name in ("before", "after"):
            m = xs[name]
            lines.append(f"| {name} | {m['probe']} | {m['auroc']:.3f}{_ci(m['auroc_ci95'])} | {_rate(m, 'tpr_at_threshold')} | "
                         f"{_rate(m, 'fpr_at_threshold')} |")
        lines += ["", f"n = {xs['n_unsafe']} unsafe + {xs['n_safe']} safe (even ids; nothing of them seen before). The shipped harm "
                  f"probe (monitors.md) reaches {xs['shipped_harm_probe_reference']}. Goal {xs['goal']}: "
                  f"{'met' if xs['goal_met'] else 'not met'}."]
    lines += ["", f"## What {report['model']} does not reach", ""]
    missed = [r for r in report["concepts"] if not r["goal_auroc_ood_met"]]
    for r in missed:
        worst = f" (worst held-out source {r['worst_source']}: {r['worst_auroc_ood']:.3f})" if r.get("worst_source") else ""
        lines.append(f"- {r['concept']}: AUROC OOD {r['auroc_ood']:.3f}{worst}, goal 0.95; TPR at the 1%-FPR threshold out of "
                     f"distribution {r['tpr_at_1pct_fpr_ood']:.3f} with FPR {r['fpr_measured_ood']:.3f}.")
    for r in report["concepts"]:
        ci = r.get("auroc_ood_ci95")
        if r["goal_auroc_ood_met"] and ci and ci[0] < 0.95:
            lines.append(f"- {r['concept']}: AUROC OOD {r['auroc_ood']:.3f} meets 0.95 on the point estimate only (95% CI {ci[0]:.3f}-{ci[1]:.3f}).")
        if r["fpr_measured_ood"] > 2 * report["target_fpr"]:
            lines.append(f"- {r['concept']}: the threshold calibrated for 1% FPR does not transfer: {r['fpr_measured_ood']:.3f} of the "
                         "out-of-distribution negatives are flagged.")
    if xs:
        ci = xs["auroc_after_ci95"]
        if not xs["goal_met"]:
            lines.append(f"- XSTest test half: {xs['auroc_after']:.3f} after twins (goal 0.90).")
        elif ci[0] < GOAL_XSTEST:
            lines.append(f"- XSTest test half: {xs['auroc_after']:.3f} after twins meets 0.90 on the point estimate only (95% CI "
                         f"{ci[0]:.3f}-{ci[1]:.3f}).")
    notes = []
    if loso:
        f = min(loso["folds"].values(), key=lambda x: x["auroc"])
        name = min(loso["folds"], key=lambda g: loso["folds"][g]["auroc"])
        notes.append(f"Harm: held out, {name} is not separated from its own safe look-alikes (AUROC {f['auroc']:.3f}; "
                     f"{f['fpr_at_threshold']:.3f} of its safe prompts flagged), so the pooled OOD TPR above is inflated by a fold "
                     "that flags nearly everything; the sources whose negatives are ordinary requests generalise (AUROC >= "
                     f"{min(x['auroc'] for g, x in loso['folds'].items() if x['negatives'] != 'same source'):.3f}).")
    if token:
        rows = token["rows"]
        pooled = next(v for k, v in rows.items() if k.startswith("pooled"))
        mil = max((v for k, v in rows.items() if "MIL" in k), key=lambda v: v["dev_auroc"])
        notes.append(f"Token level: the MIL probe (chosen on dev) transfers best to tweets: Davidson AUROC "
                     f"{mil['ood_davidson']['auroc']:.3f} vs {pooled['ood_davidson']['auroc']:.3f} pooled at the same layer "
                     "on the same 600 texts, and its threshold keeps its FPR there near 1%.")
    if xs:
        top = xs["cv"][0]
        notes.append(f"XSTest: the twins probe's harm dev AUROC is {top['harm_dev_auroc']:.3f} (the all-sources probe: "
                     f"{loso['all_sources_probe']['dev']['auroc']:.3f}); at its threshold it catches fewer unsafe XSTest "
                     "prompts than before but flags far fewer safe twins." if loso else "")
    if cyber:
        cal = cyber["calibration"]
        notes.append(f"Cyber: the threshold is set by ordinary Alpaca requests (their 1%-FPR threshold {cal['alpaca_requests']['threshold']} "
                     f"vs {cal['mmlu_general_heldout']['threshold']} for held-out general MMLU questions), yet "
                     f"{cyber['ood']['fpr_at_threshold']:.3f} of the never-seen computer-security and machine-learning questions pass "
                     "it: topic is part of what the probe reads.")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes if n]
    lines += ["", "Published probes reaching 0.96-0.999 use models 50-500x larger; nothing here says how these probes scale. "
              "Everything is model-agnostic: `--model` takes any local causal-LM folder; artifacts carry its fingerprint and are "
              "refused by another model."]
    (results / "concept_probes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
