"""The markdown of selection v2's report (safekeel.bench.selection_v2.analyse's data -> selection_v2.md)."""

from __future__ import annotations

from typing import Sequence



def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}" if value >= 1e-4 else f"{value:.1e}"


def _d(value: float | None, ci: Sequence[float] | None = None, digits: int = 3) -> str:
    if value is None:
        return "pending"
    return f"{value:+.{digits}f}" + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")


def _m(cell: dict) -> str:
    return "pending" if cell["mean"] is None else f"{cell['mean']:.3f}" + (f" [{cell['ci95'][0]:.3f}, {cell['ci95'][1]:.3f}]" if cell["ci95"] else "")


def render(data: dict) -> str:
    """The markdown report of analyse's data."""
    nom, curve, conf = data["nomination"], data["k_curve"], data["confirm"]
    lines = ["# Selection v2 (issue 31)", "", f"Plan, fixed before the data: [{data['plan']}](../selection_v2_plan.md) "
             f"(commit {data['plan_commit'] or 'unknown'}). Command: `{data['command']}`. Runs: "
             + ", ".join(f"{g} {n}" for g, n in data["n_runs"].items()) + ".", "",
             "## Phase 1: nomination", "", f"Rule: {nom['rule']}.", ""]
    if nom["inputs"]:
        lines += ["| method | datasets | dR [95%, seeds] | dO | dL | eligible |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {e['method']} | {e['n_datasets']} | " + " | ".join(_d(e[f"d{m}"], e[f"d{m}_ci95"], 4) for m in "ROL")
                  + f" | {'yes' if e['eligible'] else 'no'} |" for e in nom["inputs"]]
        lines += ["", "Per dataset (mean over the 3 seeds [bootstrap 95% interval], n = 3 pairs each):", "",
                  "| method | dataset | dR | dO | dL |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {e['method']} | {d} | " + " | ".join(_d(v[m]["mean"], v[m]["ci95"]) for m in "ROL") + " |"
                  for e in nom["inputs"] for d, v in e["datasets"].items()]
    lines += ["", f"Outcome: **{nom['outcome']}**" + (f": `{nom['method']}`, endpoint {nom['endpoint']}" if nom["method"] else "")
              + f" ({nom['reason']}).", "", "Identity shift (not deciding; goal: harmful rate at least 0.3 below random):", ""]
    lines += ["| method | seeds | d refusal | d harmful (classifier) | goal |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {e['method']} | {e['n_seeds']} | {_d(e['mean_diff_refusal'], e['refusal_ci95'])} | "
              f"{_d(e['mean_diff_harmful_rate'], e['harmful_ci95'])} | {e['goal']} |" for e in nom["identity_shift"]] or ["| pending | | | | |"]
    lines += ["", "## Comparisons with plain random (paired by seed; mean [bootstrap 95%]; p: two-sided Wilcoxon on dR)", "",
              "| dataset | method | k | seeds | dR | dO | dH (classifier) | dL | p |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {c['user_data']} | {c['method']} | {c['k']} | {c['n_seeds']} | " + " | ".join(
        _d(c["metrics"][m]["mean"], c["metrics"][m]["ci95"]) for m in ("R", "O", "H", "L")) + f" | {_p(c['p_value'])} |"
        for c in data["comparisons"]] or ["| pending | | | | | | | | |"]
    lines += ["", "## Phase 3: the k curve (descriptive; means over seeds [bootstrap 95%])", ""]
    if curve["status"] == "pending":
        lines.append(f"Pending: {curve['reason']}.")
    else:
        lines += [f"Methods: random and `{curve['method']}`" + (" (no candidate: the plan's fallback)" if curve["fallback"] else "") + ".", "",
                  "| dataset | method | k | seeds | R | O | H (classifier) | L |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {e['user_data']} | {e['method']} | {e['k']} | {e['n_seeds'] if e['status'] == 'complete' else e['status']} | "
                  + " | ".join(_m(e[m]) for m in ("R", "O", "H", "L")) + " |" for e in curve["entries"]]
    lines += ["", "## Phase 2: the confirmatory test", ""]
    if "verdict" not in conf:
        lines.append(f"{conf['status'].capitalize()}: {conf['reason']}.")
    else:
        pr = conf["primary"]
        lines += [f"**Verdict: {conf['verdict']}.**", "",
                  f"Primary: {pr['metric']}, `{conf['method']}` - random, seed means over {len(pr['datasets'])} datasets, "
                  f"{pr['n_seeds']} seeds ({conf['n_pairs']} pairs): mean {_d(pr['mean_difference'], pr['ci95'], 4)}, one-sided "
                  f"({conf['alternative']}) Wilcoxon p = {_p(pr['wilcoxon']['p_value'])} (smallest attainable {pr['min_attainable_p']:.4f}).",
                  f"Beside it, the {conf['pairs_test']['n_pairs']} pairs: mean {_d(conf['pairs_test']['mean_difference'], conf['pairs_test']['ci95'], 4)}, "
                  f"p = {_p(conf['pairs_test']['wilcoxon']['p_value'])}. Guardrail: {conf['guardrail']}.", "",
                  "| measure (two-sided, seed means) | seeds | mean [95%] | p |", "| --- | --- | --- | --- |"]
        lines += [f"| {v['label']} | {v['n_seeds']} | {_d(v['mean_difference'], v['ci95'], 4)} | {_p(v['wilcoxon']['p_value'])} |"
                  for v in conf["secondary"].values()]
        lines += ["", f"Goals against `none` (aligned refusal {_p(conf['aligned']['refusal'])}): retention >= {conf['goals_met']['retention_goal']}, "
                  f"over-refusal at most +{conf['goals_met']['overrefusal_goal']}; issue goal: {conf['goals_met']['issue_goal']} "
                  f"({conf['goals_met']['n_datasets']} datasets met).", "",
                  "| dataset | seeds | retention [95%] | dO vs none [95%] | goal |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {g['user_data']} | {g['n_seeds']} | " + ("pending" if g["retention"]["value"] is None else
                  f"{g['retention']['value']:.3f}" + (f" [{g['retention']['ci95'][0]:.3f}, {g['retention']['ci95'][1]:.3f}]"
                                                      if g["retention"]["ci95"] else ""))
                  + f" | {_d(g['overrefusal_vs_none']['mean'], g['overrefusal_vs_none']['ci95'])} | {g['goal']} |" for g in conf["goals"]]
    lines += ["", "## Runs", "", "Rates with n prompts; R and O by the content judge, H by the classifier; census (blind labels) "
              "when labelled.", "", "| grid | dataset | method | k | seed | R | O XSTest | O OR-Bench | H | L (n) | census harmful content |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["runs"]:
        rates = [r["refusal_rate"], r["overrefusal_rate"]["xstest"], r["overrefusal_rate"]["orbench"], r["harmful_rate"]]
        cells = ["n/a" if not e or e.get("rate") is None else f"{e['rate']:.3f} (n={e['n']})" for e in rates]
        loss = "n/a" if r["utility"]["loss"] is None else f"{r['utility']['loss']:.4f} ({r['utility']['n']})"
        census = r["census"]["harmful_content"] if r["census"] else None
        lines.append(f"| {r['grid']} | {r['user_data'] or 'aligned'} | {r['method'] or '-'} | {r['k']} | {'-' if r['seed'] is None else r['seed']} | "
                     + " | ".join(cells) + f" | {loss} | "
                     + ("not labelled" if census is None else f"{census['rate']:.3f} (n={census['n']})") + " |")
    return "\n".join(lines) + "\n"
