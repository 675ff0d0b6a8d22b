"""Does the same machine train the same network whatever else runs on it, and what does change it?

    python docs/determinism_check.py [--set train.KEY=VALUE ...] [--every N]

Trains one short job of params.yaml's recipe (one epoch on every Nth training X-ray, validated on every Nth
validation X-ray; the prepared splits of `dvc repro`) in fresh processes, each under one condition:

- `idle`: as it is;
- `idle again`: the same, to show the job repeats;
- `loaded`: while busy processes keep every core of the machine at work (as another training would);
- `AVX2 kernels`: with `ONEDNN_MAX_CPU_ISA=AVX2`, as on a CPU without AVX-512 (older EPYC generations):
  the kernels another CPU would dispatch to.

and prints, per condition, the digest of the trained weights, the validation ROC-AUC and the instruction set
oneDNN's kernels used (pipeline.hardware). Same digest: the same network, bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

CONDITIONS = {"idle": {}, "idle again": {}, "loaded": {}, "AVX2 kernels": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}


def busy(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        sum(i * i for i in range(10_000))


def train_once(assignments: list[str], every: int) -> dict[str, object]:
    """The job itself (run in a child process): its weights' digest, validation ROC-AUC and kernels."""
    import tempfile
    from dataclasses import fields, replace

    import numpy as np
    from recipe_search import with_overrides

    from pipeline import hardware, train
    from pipeline.arrays import load_split
    from pipeline.params import load_params

    params = load_params()
    recipe = replace(with_overrides(params.train, assignments), epochs=1)

    def every_nth(split):
        return replace(split, **{f.name: getattr(split, f.name)[::every] for f in fields(split)})

    train.make_deterministic(params.seed)
    with tempfile.TemporaryDirectory() as scratch:
        model, rows = train.fit(recipe, params.seed, every_nth(load_split("train")), every_nth(load_split("val")),
                                Path(scratch) / "best.weights.h5")
    digest = hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()[:16]
    return {"weights": digest, "val_auc": round(rows[0]["val_auc"], 6), "kernels": hardware.kernel_isa()}


def run_condition(name: str, assignments: list[str], every: int) -> dict[str, object]:
    env = {**os.environ, **CONDITIONS[name], "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, __file__, "--child", "--every", str(every),
               *(f"--set={assignment}" for assignment in assignments)]
    workers = []
    if name == "loaded":
        stop_at = time.monotonic() + 3600
        workers = [multiprocessing.Process(target=busy, args=(stop_at,), daemon=True)
                   for _ in range(os.cpu_count() or 1)]
        for worker in workers:
            worker.start()
    try:
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    finally:
        for worker in workers:
            worker.terminate()
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="train.KEY=VALUE")
    parser.add_argument("--every", type=int, default=4, help="train on every Nth X-ray (default 4)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(train_once(args.assignments, args.every)))
        return 0
    print("| condition | weights (sha256, first 16) | validation ROC-AUC | oneDNN kernels |")
    print("| --- | --- | --- | --- |")
    for name in CONDITIONS:
        result = run_condition(name, args.assignments, args.every)
        print(f"| {name} | `{result['weights']}` | {result['val_auc']} | {result['kernels']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
