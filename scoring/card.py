"""The model card, rendered from a `Decision` alone: the app's model panel and an export's MODEL_CARD.md.

Beside the scoring core, which it only reads (no client, no Gradio): `pipeline.export` writes it without
importing any serving module.

External figures (the official test's distribution) come first; splits carved from the training data are
labelled in-distribution, since a model can look perfect there and still fail on another site's images.
"""

from __future__ import annotations

from datetime import UTC, datetime

from scoring.decision import Decision
from scoring.orientation import ORIENTATIONS
from scoring.wording import percent

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
RULE_WORDS = {
    "youden": "Chosen to balance sensitivity and specificity (Youden's index)",
    "sensitivity": "The highest threshold that still finds the target share of pneumonia cases (sensitivity rule)",
    "sensitivity_bound": ("The highest threshold whose sensitivity, at its 95% lower confidence bound, still "
                          "reaches the target (sensitivity-bound rule)"),
}
GATE_WORDS = (
    "before scoring, the model measures how far the image's features lie from those of the training X-rays; "
    "an image too far from them is refused as \"not recognised as a frontal paediatric chest X-ray\"."
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
# Shares of images, shown in percent as every probability on the page; scores such as ROC-AUC stay 0 to 1.
PROPORTIONS = {"accuracy", "sensitivity", "specificity", "precision"}
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
        f"- **Trained:** {_trained_at(decision.trained_at)}, from commit {_commit(decision.training_commit)}",
        f"- **Training run:** `{decision.run_id or 'unknown'}`; data digest `{decision.data_digest or 'unknown'}`",
        (f"- **Decision threshold:** {percent(decision.threshold)} probability of pneumonia "
         f"({decision.threshold:.4f} in the JSON). {RULE_WORDS.get(decision.threshold_rule, decision.threshold_rule)}"
         f"{_achieved_sensitivity(decision, fitted_on)}; fitted on the {fitted_on} split "
         f"(calibration: {calibration.get('method', 'none')})"),
    ]
    if decision.network:
        lines.append(_network_line(decision.network))
    lines += _triage_lines(decision)
    if decision.ood:
        lines.append(f"- **Input gate:** {GATE_WORDS} Technical: `{decision.ood.get('score', 'score')}`, "
                     f"refused above {decision.ood.get('limit', float('nan')):.4f} (`ood_score` in the JSON).")
    lines.append("")
    for split in ("external", "test", "val"):
        if decision.metrics.get(split):
            lines += _metrics_table(split, decision.metrics[split], decision.images.get(split), fitted_on)
    if not decision.metrics:
        lines += ["*No evaluation metrics were recorded with this model.*", ""]
    lines += _beside_the_diagnosis(decision, fitted_on)
    lines += [f"**Training data:** {DATA_SOURCE}", "", f"**Intended use:** {INTENDED_USE}", ""]
    if decision.ood:
        lines += [GATE_LIMITS, ""]
    lines.append(NOT_A_DEVICE)
    return "\n".join(lines)


def _network_line(network: dict) -> str:
    """The network and the origin of its starting weights (a pretrained backbone's credit and licence)."""
    size, parameters = network.get("image_size"), network.get("parameters")
    details = ", ".join(filter(None, [f"{size} px" if size else "", f"{parameters / 1e6:.2f} M parameters"
                                      if parameters else ""]))
    return (f"- **Network:** `{network.get('backbone', 'unknown')}`{f' ({details})' if details else ''}; "
            f"starting weights: {network.get('initial_weights', 'unknown')}")


def _commit(commit: str) -> str:
    clean = commit.removesuffix("-dirty")
    return f"`{clean}`" + (" (uncommitted changes)" if clean != commit else "")


def _achieved_sensitivity(decision: Decision, split: str) -> str:
    parts = [] if decision.target_sensitivity is None else [f"target {percent(decision.target_sensitivity)}"]
    value = (decision.metrics.get(split, {}).get("sensitivity") or {}).get("value")
    if value is not None:
        parts.append(f"on the {split} split it found {percent(value)} of pneumonia cases")
    return f" ({'; '.join(parts)})" if parts else ""


def _triage_lines(decision: Decision) -> list[str]:
    lines = []
    triage = decision.triage
    if triage:
        targets = ", ".join(f"{name.removeprefix('target_')} at least {percent(triage[name])}"
                            for name in ("target_accuracy", "target_sensitivity") if triage.get(name) is not None)
        lines.append(f"- **Triage:** below {percent(triage['normal_below'])} normal, from "
                     f"{percent(triage['pneumonia_from'])} pneumonia, in between **needs review by a reader**; "
                     f"the band leaves the fewest images to review while the images it decides reach "
                     f"{targets or 'its targets'} (fitted on the {triage.get('fitted_on', 'validation')} split)")
    lines.append(f"- **Kind of pneumonia:** called likely viral when the probability that it is viral is at least "
                 f"{percent(decision.subtype_threshold)}, else likely bacterial (a hint, not a diagnosis)")
    return lines


SUBGROUP_WORDS = {"normal_IM": "normal, `IM-*` files", "normal_NORMAL2": "normal, `NORMAL2-*` files",
                  "bacterial": "bacterial pneumonia", "viral": "viral pneumonia"}
TRIAGE_WORDS = {"review_share": "sent to review", "decided_accuracy": "accuracy of those decided",
                "decided_sensitivity": "sensitivity of those decided", "decided_specificity": "specificity of those decided"}


def _beside_the_diagnosis(decision: Decision, fitted_on: str) -> list[str]:
    """Triage, bacterial/viral, the error by subgroup and what happens to turned or noisy X-rays, on the
    split that fitted the decision (out of fold there)."""
    lines: list[str] = []
    triage = decision.triage_metrics.get(fitted_on)
    if triage:
        lines += [f"**Triage** ({fitted_on} split, out of fold): "
                  + "; ".join(f"{TRIAGE_WORDS[key]} {percent(value)}" for key, value in triage.items()
                              if key in TRIAGE_WORDS and value is not None), ""]
    subtype = decision.subtype_metrics.get(fitted_on)
    if subtype:
        lines += _metrics_table(f"{fitted_on}: bacterial (negative) or viral (positive), pneumonia images only",
                                {key: subtype[key] for key in ("roc_auc", "accuracy", "sensitivity", "specificity")
                                 if key in subtype}, None, "")
    groups = decision.subgroups.get(fitted_on)
    if groups:
        lines += [f"**Called pneumonia, by subgroup** ({fitted_on} split): "
                  + "; ".join(f"{SUBGROUP_WORDS.get(name, name)} {percent(group['called_pneumonia'])} of "
                              f"{group['images']}" for name, group in groups.items() if group["images"]), ""]
    served = decision.robustness
    if served:
        shown = [name for name in ORIENTATIONS if name in served]
        shown += sorted(name for name in served if name not in ("split", *ORIENTATIONS))
        heading = f"**Turned, mirrored and noisy copies** of the {served.get('split', '')} X-rays, through the serving path:"
        lines += [heading, "", "| copies | scored | label differs from upright | accuracy of scored |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {_share(served[name]['scored'])} | {_share(served[name]['label_differs_from_upright'])} "
                  f"| {_share(served[name]['accuracy_of_scored'])} |" for name in shown]
        lines.append("")
    return lines


def _share(value: float | None) -> str:
    """A measured share, exactly (0% is none at all, unlike a probability's "< 0.1%")."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _metrics_table(split: str, metrics: dict, images: int | None, fitted_on: str) -> list[str]:
    fold = "; calibration and threshold fitted on it, figures out of fold" if fitted_on == split else ""
    heading = SPLIT_TITLES.get(split, split).format(fold=fold)
    count = f", {images} images" if images else ""
    rows = [f"**{heading}**{count}, 95% bootstrap CI:", "", "| metric | value | 95% CI |", "| --- | --- | --- |"]
    for key, values in metrics.items():
        values = values if isinstance(values, dict) else {"value": values}
        shown = percent if key in PROPORTIONS else _number
        rows.append(f"| {METRIC_NAMES.get(key, key)} | {shown(values.get('value')) or 'n/a'} | "
                    f"{shown(values.get('ci_low')) or 'n/a'} to {shown(values.get('ci_high')) or 'n/a'} |")
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
