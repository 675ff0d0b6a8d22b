"""What the input gate adds to scoring one image: the served artefact (`models/serving.onnx`) against the
same network and decision assembled without the gate (built here from `models/model.keras` and
`models/decision.json`, as the assemble stage builds it: TensorFlow needed), on the same images.

    python benchmarks/gate_cost.py [--repeats 1000] [--output benchmarks/gate-results.json]

Times `ServingArtefact.run` on one example image at a time (the app's case), after `dvc repro`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from scoring.imaging import decode_greyscale, resize_grey
from scoring.runtime import ServingArtefact

ROOT = Path(__file__).resolve().parent.parent
NETWORK = ROOT / "models" / "model.keras"
DECISION = ROOT / "models" / "decision.json"
WITH_GATE = ROOT / "models" / "serving.onnx"
EXAMPLES = sorted((ROOT / "examples").glob("*.png"))
TARGET_ADDED_MS = 0.5
BLOCK = 100


def timings_ms(artefacts: dict[str, ServingArtefact], images: list[np.ndarray], repeats: int) -> dict[str, list[float]]:
    """Blocks of `BLOCK` calls per artefact, alternating, so that drift on the machine hits both alike.
    Not call by call: each ONNX Runtime session's threads spin for a while after a run, and would steal
    the other session's cores (the app has one session)."""
    samples: dict[str, list[float]] = {name: [] for name in artefacts}
    for start in range(0, repeats, BLOCK):
        for name, artefact in artefacts.items():
            for index in range(start, min(start + BLOCK, repeats)):
                batch = images[index % len(images)][np.newaxis]
                started = time.perf_counter()
                artefact.run(batch)
                samples[name].append((time.perf_counter() - started) * 1000.0)
    return samples


def without_gate() -> ServingArtefact:
    import keras

    from pipeline.artefact import build
    from scoring.decision import Decision

    network = keras.models.load_model(NETWORK, compile=False, safe_mode=True)
    return ServingArtefact(build(network, Decision.from_json(DECISION.read_text(encoding="utf-8"))), "no gate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1000)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    artefacts = {"without gate": without_gate(), "with gate": ServingArtefact.from_file(WITH_GATE)}
    size = artefacts["with gate"].input_size
    images = [resize_grey(decode_greyscale(path.read_bytes()), size) for path in EXAMPLES]
    timings_ms(artefacts, images, 50)  # warm-up
    samples = timings_ms(artefacts, images, args.repeats)
    p50 = {name: float(np.percentile(values, 50)) for name, values in samples.items()}
    added = p50["with gate"] - p50["without gate"]
    result = {"p50_ms": p50, "p95_ms": {name: float(np.percentile(values, 95)) for name, values in samples.items()},
              "added_p50_ms": added, "target_added_ms": TARGET_ADDED_MS, "repeats": args.repeats}
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0 if added <= TARGET_ADDED_MS else 1


if __name__ == "__main__":
    sys.exit(main())
