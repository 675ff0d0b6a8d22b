"""Re-run evaluation of finished experiments' models under other calibration and threshold rules.

    python docs/rescore_experiment.py NAME=MD5 [NAME=MD5 ...] [--variants platt:youden,...] [--resamples 200]

MD5 is the experiment's `models/model.keras` hash (`dvc exp show --json -A`, outs); the model is read
from the DVC cache. DVC's run cache cannot skip retraining for this pipeline (the train stage has
uncached outputs), so comparing evaluation-only settings through `dvc exp run` would retrain each time.
This uses the pipeline's own `evaluate` and robustness code on the prepared splits in `data/prepared`:
calibration and threshold fitted on validation, reported on validation, carved test and shifted test.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import keras

from pipeline.common import stage_params
from pipeline.evaluate import evaluate
from pipeline.preprocess import load_split
from pipeline.robustness import build_shifts, measure
from pipeline.serving import Scorer

CACHE = Path(".dvc/cache/files/md5")
VARIANTS = "temperature:youden,temperature:sensitivity_bound,platt:youden,platt:sensitivity_bound"


def load_cached_model(digest: str) -> keras.Model:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "model.keras"  # Keras wants the extension
        shutil.copy(CACHE / digest[:2] / digest[2:], path)
        return keras.models.load_model(path, compile=False, safe_mode=True)


def rescore(name: str, model: keras.Model, variants: list[tuple[str, str]], resamples: int) -> list[str]:
    raw, val_split, test_split = Scorer(model), load_split("val"), load_split("test")
    rows = []
    for calibration, rule in variants:
        params = {**stage_params("evaluate"), "calibration": calibration, "threshold_rule": rule,
                  "bootstrap_resamples": resamples}
        report, _ = evaluate(raw, params)
        scorer = Scorer(model, None, report["temperature"], report["calibration_bias"])
        shifts = build_shifts(stage_params("robustness"))
        shifted = measure(scorer, *test_split, report["threshold"], shifts, params["seed"])
        shifted_val = measure(scorer, *val_split, report["threshold"], shifts, params["seed"])
        val, test = report["val"], report["test"]
        cells = [name, calibration, rule, f"{report['temperature']:.2f}", f"{report['calibration_bias']:+.2f}",
                 f"{report['threshold']:.3f}"]
        cells += [f"{val[key]['value']:.3f}" for key in ("ece", "sensitivity", "specificity")]
        cells += [f"{test[key]['value']:.3f}" for key in ("ece", "accuracy", "sensitivity", "specificity")]
        cells += [f"{shifted['shifts']['resolution 64px']['specificity']:.3f}",
                  f"{shifted['worst_change']['specificity']:+.3f}", f"{shifted_val['worst_change']['specificity']:+.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="NAME=MD5")
    parser.add_argument("--variants", default=VARIANTS, help="calibration:threshold_rule pairs, comma-separated")
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples (CIs are not printed)")
    args = parser.parse_args(argv)
    variants = [tuple(pair.split(":", 1)) for pair in args.variants.split(",")]
    print("| run | calibration | threshold rule | T | bias | threshold | val ECE | val sens. | val spec. | "
          "test ECE | test acc. | test sens. | test spec. | test spec. at 64 px | worst test spec. change | "
          "worst val spec. change |")
    print("| " + " | ".join(["---"] * 16) + " |")
    for name, _, digest in (item.partition("=") for item in args.models):
        for line in rescore(name, load_cached_model(digest), variants, args.resamples):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
