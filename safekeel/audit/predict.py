"""Predicting how much safety a dataset will cost before training: a model fitted on measured runs.

Training rows are datasets: each with its audit (safekeel.audit.shift.AuditReport as a dict) and the measured
no-replay increase of a metric (`METRICS`; fine-tuned without safety data minus the aligned model, mean over seeds,
under a named judge): `complied`, compliance with harmful requests (1 - the judge's refusal rate; what fine-tuning
the 135M organism changes, benchmarks/audit_policy_plan.md), or `harmful`, the judge's harmful verdicts. The model
is deliberately small because the rows are few (a panel of tens of datasets):

- one audit score x, chosen by leave-one-out squared error among `FEATURES`;
- ordinary least squares, increase = a + b x;
- a prediction interval at `level`: y_hat +- t_{n-2} s sqrt(1 + 1/n + (x - x_mean)^2 / Sxx), clipped to [-1, 1].

`fit` also reports honest out-of-sample quality: a nested leave-one-out (the held-out dataset, or with rows' "group"
the held-out group of datasets that share examples or a source, takes no part in choosing the score or fitting it)
gives `leave_one_out_rho` (Spearman of the held-out predictions with the measured increases) and its mean absolute
error. The fitted model is saved as JSON with its training rows and
their sha256, the judge and metric whose rates it learned (a file without a metric predates it: `harmful`) and the
command that made it; `safekeel audit` and the job's
audit stage attach its prediction to the report, and the adaptive policy (safekeel.audit.act) acts on it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats

from safekeel.provenance import sha256_json, write_json_atomic

ASSET = "harm_predictor.json"
FEATURES = ("gated_fraction", "harmful_request_fraction", "persona_override_fraction", "harmful_answer_fraction",
            "answer_mean_score", "mean_harmful_similarity", "harmful_centroid_similarity", "lda_harmful_side_share",
            "lda_mean_projection", "frechet_harmful", "frechet_safe", "frechet_ratio", "frechet_harmful_excess",
            "frechet_safe_excess", "mmd2_harmful", "mmd2_safe",
            "hidden_lda_harmful_side_share", "hidden_lda_mean_projection", "hidden_frechet_ratio")
METRICS = {"complied": ("increase in compliance with harmful requests", "1 - refusal rate"),
           "harmful": ("harmful-rate increase", "harmful verdicts")}
"""What a predictor's increase is of: (name, how it is measured). `complied`: 1 - the judge's refusal rate on the harmful
set; `harmful`: the judge's harmful verdicts (the predictor files made before the metric was recorded)."""


def target_name(metric: str, judge: str = "") -> str:
    """The predicted quantity by name, e.g. "increase in compliance with harmful requests (1 - refusal rate, content
    judge)"; ValueError for an unknown metric."""
    if metric not in METRICS:
        raise ValueError(f"unknown predictor metric {metric!r}; known: {', '.join(METRICS)}")
    name, measured = METRICS[metric]
    return f"{name} ({measured}" + (f", {judge} judge)" if judge else ")")


def describe_prediction(prediction: dict) -> str:
    """One line: "predicted no-replay <target>: +0.123 (90% interval ...; from <score>, fitted on n datasets)"."""
    target = prediction.get("target") or target_name(prediction.get("metric", "harmful"), prediction.get("judge", ""))
    return (f"predicted no-replay {target}: {prediction['predicted_increase']:+.3f} ({prediction['level']:.0%} interval "
            f"{prediction['ci_low']:+.3f} to {prediction['ci_high']:+.3f}; from {prediction['feature']}, fitted on "
            f"{prediction['n_training_datasets']} datasets)")


def audit_features(report: dict) -> dict[str, float]:
    """The audit's scores as predictor features (names: FEATURES; those the report lacks are left out)."""
    n = max(int(report.get("n_examples") or 0), 1)
    counts = report.get("flag_counts") or {}
    out: dict[str, float] = {"gated_fraction": float(report.get("gated_fraction") or 0.0),
                             "harmful_request_fraction": counts.get("harmful_request", 0) / n,
                             "persona_override_fraction": counts.get("persona_override", 0) / n,
                             "mean_harmful_similarity": float(report["mean_harmful_similarity"]),
                             "harmful_centroid_similarity": float(report["harmful_centroid_similarity"])}
    if report.get("answer_judge"):
        out["harmful_answer_fraction"] = counts.get("harmful_answer", 0) / n
        out["answer_mean_score"] = float(report["answer_judge"]["mean_score"])
    for prefix, distances in (("", report.get("distances")), ("hidden_", report.get("hidden_state_distances"))):
        if not distances:
            continue
        out[f"{prefix}lda_harmful_side_share"] = float(distances["lda"]["harmful_side_share"])
        out[f"{prefix}lda_mean_projection"] = float(distances["lda"]["mean_projection"])
        out[f"{prefix}frechet_ratio"] = float(distances["harmful"]["frechet"]) / max(float(distances["safe"]["frechet"]), 1e-9)
        if not prefix:
            out["frechet_harmful"] = float(distances["harmful"]["frechet"])
            out["frechet_safe"] = float(distances["safe"]["frechet"])
            out["mmd2_harmful"] = float(distances["harmful"]["mmd2"])
            out["mmd2_safe"] = float(distances["safe"]["mmd2"])
            for side in ("harmful", "safe"):  # reports from before the size floor have none
                if "frechet_excess" in distances[side]:
                    out[f"frechet_{side}_excess"] = float(distances[side]["frechet_excess"])
    return out


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(intercept, slope); slope 0 when x does not vary."""
    sxx = float(((x - x.mean()) ** 2).sum())
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / sxx) if sxx > 0 else 0.0
    return float(y.mean() - slope * x.mean()), slope


def _groups(rows: Sequence[dict]) -> list[str]:
    """Each row's group (its "group", else its name): what leave-out validation holds out together."""
    return [str(row.get("group") or row["name"]) for row in rows]


def _loo_error(x: np.ndarray, y: np.ndarray, groups: Sequence[str]) -> float:
    """Mean squared leave-one-group-out error of y ~ a + b x."""
    groups = np.asarray(groups)
    errors = []
    for group in dict.fromkeys(groups.tolist()):
        keep = groups != group
        a, b = _ols(x[keep], y[keep])
        errors.extend((y[~keep] - (a + b * x[~keep])) ** 2)
    return float(np.mean(errors))


def _usable(rows: Sequence[dict], features: Sequence[str]) -> list[str]:
    """Features every row has, that vary across rows."""
    out = []
    for name in features:
        values = [row["features"].get(name) for row in rows]
        if all(v is not None and math.isfinite(v) for v in values) and len(set(values)) > 1:
            out.append(name)
    return out


def _choose(rows: Sequence[dict], features: Sequence[str]) -> tuple[str, dict[str, float]]:
    y = np.array([row["increase"] for row in rows], dtype=np.float64)
    errors = {name: _loo_error(np.array([row["features"][name] for row in rows], dtype=np.float64), y, _groups(rows))
              for name in features}
    return min(errors, key=lambda name: (errors[name], name)), errors


@dataclass
class HarmPredictor:
    feature: str
    intercept: float
    slope: float
    residual_sd: float
    n: int
    x_mean: float
    sxx: float
    level: float = 0.9
    judge: str = ""
    """Whose rates the increases are (a registered judge's name, or "adjudicated")."""
    metric: str = "harmful"
    """Which of the judge's rates (METRICS): a file without one predates the field and learned harmful rates."""
    training_rows: list = field(default_factory=list)
    """{"name", "features", "increase", "n_seeds"} per dataset."""
    training_data_sha256: str = ""
    quality: dict = field(default_factory=dict)
    """Nested leave-one-out: leave_one_out_rho, leave_one_out_mae, n; per-feature Spearman rho on all rows."""
    made_by: str = ""
    provenance: dict = field(default_factory=dict)
    """Where the training rows came from (the panel's fit: each variant's data sha256, the audits file's sha256 and
    settings, the run ids behind each increase); empty in files made before it was recorded."""

    def __post_init__(self) -> None:
        target_name(self.metric)  # an unknown metric fails here, naming it

    def predict(self, report: dict) -> dict:
        """{"predicted_increase", "ci_low", "ci_high", "level", "feature", "value", "judge", "metric", "target",
        "n_training_datasets", "model_sha256"} for an audit report."""
        return self.predict_features(audit_features(report))

    def predict_features(self, features: dict[str, float]) -> dict:
        """The prediction from an audit's scores (audit_features)."""
        if self.feature not in features:
            raise ValueError(f"the predictor reads the audit score {self.feature!r}, which this audit does not have "
                             f"(it has: {', '.join(sorted(features))}); audit with the same options it was fitted on")
        x = features[self.feature]
        point = self.intercept + self.slope * x
        quantile = float(stats.t.ppf((1 + self.level) / 2, max(self.n - 2, 1)))
        spread = self.residual_sd * math.sqrt(1 + 1 / self.n + ((x - self.x_mean) ** 2 / self.sxx if self.sxx > 0 else 0.0))
        clip = lambda v: round(float(min(max(v, -1.0), 1.0)), 4)  # noqa: E731 - a rate difference
        return {"predicted_increase": clip(point), "ci_low": clip(point - quantile * spread),
                "ci_high": clip(point + quantile * spread), "level": self.level, "feature": self.feature,
                "value": round(x, 4), "judge": self.judge, "metric": self.metric,
                "target": target_name(self.metric, self.judge), "n_training_datasets": self.n,
                "model_sha256": self.training_data_sha256}

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, {"kind": "one audit score, least squares, t prediction interval "
                                         "(safekeel.audit.predict)", **self.to_dict()})

    @classmethod
    def load(cls, path: str | Path | None = None) -> "HarmPredictor":
        text = (resources.files("safekeel.audit") / "assets" / ASSET).read_text() if path is None else Path(path).read_text()
        data = json.loads(text)
        data.pop("kind", None)
        return cls(**data)


def shipped_predictor() -> HarmPredictor | None:
    """The predictor shipped in the package (safekeel/audit/assets/harm_predictor.json), or None when none is."""
    try:
        return HarmPredictor.load()
    except FileNotFoundError:
        return None


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    rho = stats.spearmanr(a, b).statistic
    return float(rho) if np.isfinite(rho) else 0.0


def fit_predictor(rows: Sequence[dict], features: Sequence[str] = FEATURES, level: float = 0.9, judge: str = "",
                  made_by: str = "", metric: str = "harmful", provenance: dict | None = None) -> HarmPredictor:
    """Fit on rows {"name", "features": audit_features(...), "increase", "n_seeds"[, "group"]} (one per dataset):
    increases of `metric` (METRICS) under `judge`. Rows sharing a "group" (datasets that share examples or a source:
    draws of one corpus, harmful mixes of one base) are held out together in the nested validation and in choosing the
    score, so a near-copy in training cannot flatter the held-out prediction; without groups each row is its own."""
    target_name(metric)
    rows = [dict(row) for row in rows]
    if len(rows) < 4:
        raise ValueError(f"fitting the harm predictor needs at least 4 measured datasets, got {len(rows)}")
    usable = _usable(rows, features)
    if not usable:
        raise ValueError("no audit score is present in every training row and varies across them")
    y = np.array([row["increase"] for row in rows], dtype=np.float64)
    groups = _groups(rows)
    if len(set(groups)) < 3:
        raise ValueError(f"the nested leave-one-group-out validation needs at least 3 groups, got {len(set(groups))}")
    held_out = [0.0] * len(rows)
    for group in dict.fromkeys(groups):  # nested: the held-out group takes no part in choosing or fitting
        rest = [row for row, g in zip(rows, groups) if g != group]
        name, _ = _choose(rest, _usable(rest, usable) or usable)
        x_rest = np.array([row["features"][name] for row in rest], dtype=np.float64)
        a, b = _ols(x_rest, np.array([row["increase"] for row in rest], dtype=np.float64))
        for i in (i for i, g in enumerate(groups) if g == group):
            held_out[i] = a + b * rows[i]["features"][name]
    chosen, errors = _choose(rows, usable)
    x = np.array([row["features"][chosen] for row in rows], dtype=np.float64)
    intercept, slope = _ols(x, y)
    residuals = y - (intercept + slope * x)
    residual_sd = float(math.sqrt((residuals ** 2).sum() / max(len(rows) - 2, 1)))
    quality = {"leave_one_out_rho": round(spearman(held_out, y), 4),
               "leave_one_out_mae": round(float(np.mean(np.abs(np.array(held_out) - y))), 4),
               "leave_one_out_predictions": [round(float(v), 4) for v in held_out], "n": len(rows),
               "held_out_unit": "group" if any(row.get("group") for row in rows) else "dataset", "n_groups": len(set(groups)),
               "feature_rho": {name: round(spearman([row["features"][name] for row in rows], y), 4) for name in usable},
               "feature_loo_mse": {name: round(v, 6) for name, v in errors.items()}}
    return HarmPredictor(chosen, intercept, slope, residual_sd, len(rows), float(x.mean()), float(((x - x.mean()) ** 2).sum()),
                         level, judge, metric=metric, training_rows=rows, training_data_sha256=sha256_json(rows),
                         quality=quality, made_by=made_by, provenance=dict(provenance or {}))
