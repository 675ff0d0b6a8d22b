"""The model card, rendered from the artefact's decision: the app's model panel and MODEL_CARD.md.

External figures (the official test's distribution) come first; splits carved from the training data are
labelled in-distribution, since a model can look perfect there and still fail on another site's images.
"""

from __future__ import annotations

from datetime import UTC, datetime

from serving.decision import Decision

DATA_SOURCE = (
    "Kermany D., Zhang K., Goldbaum M. (2018), *Labeled Optical Coherence Tomography (OCT) and Chest X-Ray "
    "Images for Classification*, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, CC BY 4.0: paediatric "
    "chest X-rays (children aged 1 to 5, anterior-posterior views, one centre in Guangzhou)."
)
INTENDED_USE = (
    "Research and teaching: showing how a screening model trained on this public dataset behaves. "
    "Scores mean little for adults, lateral views, other hospitals' equipment or anything that is not "
    "a paediatric chest X-ray."
)
NOT_A_DEVICE = (
    "**Not a medical device.** Not for diagnosis, triage or any clinical decision; it has not been "
    "clinically validated."
)
GATE_LIMITS = (
    "**What the input gate cannot catch:** it refuses images whose features are far from the training "
    "X-rays (photographs, scans of text, other modalities), but an adult, lateral or otherwise unusual "
    "chest X-ray may still be scored."
)
METRIC_NAMES = {
    "roc_auc": "ROC-AUC", "pr_auc": "PR-AUC", "accuracy": "accuracy", "sensitivity": "sensitivity",
    "specificity": "specificity", "precision": "precision", "f1": "F1", "brier": "Brier score",
    "ece": "expected calibration error",
}
SPLIT_TITLES = {
    "external": "External set (official test distribution{fold})",
    "test": "Carved test split (in-distribution: same source as training)",
    "val": "Validation split (in-distribution)",
}


def card_markdown(decision: Decision, title: bool = False) -> str:
    name = decision.model_name
    heading = f"{name} version {decision.model_version}" if decision.model_version else name
    lines = [f"# Model card: {heading}", ""] if title else [f"**Model:** {heading}", ""]
    calibration = decision.calibration or {}
    fitted_on = calibration.get("fitted_on", "validation")
    lines += [
        f"- **Trained:** {_trained_at(decision.trained_at)}, from commit `{decision.training_commit}`",
        f"- **Training run:** `{decision.run_id or 'unknown'}`; data digest `{decision.data_digest or 'unknown'}`",
        (f"- **Decision threshold:** {decision.threshold:.4f} (rule: {decision.threshold_rule}, chosen on the "
         f"{fitted_on} split; calibration: {calibration.get('method', 'none')})"),
    ]
    if decision.ood:
        lines.append(f"- **Input gate:** {decision.ood.get('score', 'score')} above "
                     f"{decision.ood.get('limit', float('nan')):.4g} is refused")
    lines.append("")
    for split in ("external", "test", "val"):
        if decision.metrics.get(split):
            lines += _metrics_table(split, decision.metrics[split], decision.images.get(split), fitted_on)
    if not decision.metrics:
        lines += ["*No evaluation metrics were recorded with this model.*", ""]
    lines += [f"**Training data:** {DATA_SOURCE}", "", f"**Intended use:** {INTENDED_USE}", ""]
    if decision.ood:
        lines += [GATE_LIMITS, ""]
    lines.append(NOT_A_DEVICE)
    return "\n".join(lines)


def _metrics_table(split: str, metrics: dict, images: int | None, fitted_on: str) -> list[str]:
    fold = "; calibration and threshold fitted on it, figures out of fold" if fitted_on == split else ""
    heading = SPLIT_TITLES.get(split, split).format(fold=fold)
    count = f", {images} images" if images else ""
    rows = [f"**{heading}**{count}, 95% bootstrap CI:", "", "| metric | value | 95% CI |", "| --- | --- | --- |"]
    for key, values in metrics.items():
        values = values if isinstance(values, dict) else {"value": values}
        rows.append(f"| {METRIC_NAMES.get(key, key)} | {_number(values.get('value'))} | "
                    f"{_number(values.get('ci_low'))} to {_number(values.get('ci_high'))} |")
    return rows + [""]


def _number(value) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _trained_at(value: str | None) -> str:
    if not value:
        return "unknown date"
    try:
        return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return "unknown date"
