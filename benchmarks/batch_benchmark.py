"""Batch scoring throughput: Spark local[N] (`python -m pipeline.batch`) against the predict CLI
(`python -m pipeline.predict`) on the same images and cores, in the same run, with where the time goes.

    python benchmarks/batch_benchmark.py [--archive ZIP] [--model-uri URI | --artefact ONNX]
        [--master local[2]] [--repeats 2] [--limit N] [--output benchmarks/batch-results.json]

The archive (default: the 5,216-image training mirror) is extracted to a temporary folder. Without
--model-uri, the artefact (default: models/registered/model.onnx, else models/serving.onnx) is logged as
the project's pyfunc (`pipeline.register.log_serving_model`) and registered in a throwaway SQLite store,
so both tools score the very same registered model. Measured, per repeat, alternating the tools:
- end to end: each tool as a user runs it (a fresh process: imports, model, Spark start included);
- steady state: the CLI's scoring loop in process (`Predictor.predict_paths`, what the CLI runs after
  start-up), and a Spark job on a warm session (JVM up, Python workers started: a second job);
- components, one core: decoding, the model (ONNX Runtime on decoded images), the pyfunc's own overhead.
Per-image overhead of Spark = (Spark steady-state seconds - CLI steady-state seconds) / images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from scoring.locations import MODEL_NAME

PROJECT = Path(__file__).resolve().parents[1]
# The mirror of the training split, where this project's machines keep it (../shared beside the project).
DEFAULT_ARCHIVE = PROJECT.parent / "shared" / "datasets" / "chest-xray-train-224.zip"
SUMMARY_LINE = re.compile(r"scored (\d+) of (\d+) files in ([\d.]+) s")


def extract(archive: Path, folder: Path, limit: int | None) -> list[Path]:
    with zipfile.ZipFile(archive) as bundle:
        names = sorted(n for n in bundle.namelist() if n.lower().endswith((".jpeg", ".jpg", ".png")))
        names = names[:limit] if limit else names
        for name in names:
            bundle.extract(name, folder)
    return sorted(p for p in folder.rglob("*") if p.is_file())


def register_throwaway(artefact: Path, store: Path) -> str:
    """Log the artefact as the project's pyfunc and register it in a SQLite store; returns its models:/ URI."""
    import mlflow

    from pipeline.register import log_serving_model

    staged = store / "stage" / "model.onnx"  # the pyfunc expects the artefact under this name
    staged.parent.mkdir(parents=True)
    staged.write_bytes(artefact.read_bytes())
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    experiment = mlflow.create_experiment("batch-benchmark", artifact_location=(store / "mlruns").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    cwd = Path.cwd()
    os.chdir(PROJECT)  # log_serving_model names the pyfunc's code and example relative to the project
    try:
        uri = log_serving_model(run.info.run_id, staged)
    finally:
        os.chdir(cwd)
    version = mlflow.register_model(uri, MODEL_NAME)
    return f"models:/{MODEL_NAME}/{version.version}"


def timed(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode not in (0, 1):  # 1: some files refused, which is a result, not a failure
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return seconds, result


def cli_end_to_end(folder: Path, uri: str, out: Path, env: dict[str, str]) -> float:
    seconds, _ = timed([sys.executable, "-m", "pipeline.predict", str(folder), "--model-uri", uri,
                        "--output", str(out)], env)
    return seconds


def spark_end_to_end(folder: Path, uri: str, out: Path, master: str, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds of the whole command, seconds of its scoring job as it reports them)."""
    seconds, result = timed([sys.executable, "-m", "pipeline.batch", str(folder), "--output", str(out),
                             "--master", master, "--model-uri", uri, "--overwrite"], env)
    match = SUMMARY_LINE.search(result.stdout)
    if match is None:
        raise RuntimeError(f"no summary in the batch output:\n{result.stdout}\n{result.stderr}")
    return seconds, float(match.group(3))


def cli_steady(paths: list[Path], uri: str) -> float:
    from scoring.runtime import Predictor
    from scoring.store import load_artefact

    predictor = Predictor(load_artefact(uri))
    predictor.predict_paths(paths[:64])  # warm up ONNX Runtime
    started = time.perf_counter()
    predictor.predict_paths(paths)
    return time.perf_counter() - started


def spark_session_runs(folder: Path, uri: str, scratch: Path, master: str, jobs: int = 2) -> dict[str, float]:
    """Session start, then `jobs` jobs on it: the first pays for Python workers and model loading."""
    from pipeline import batch

    model = batch.resolve_model(uri, scratch / "model")
    started = time.perf_counter()
    spark = batch.start_spark(master)
    timings = {"session_start_s": time.perf_counter() - started}
    try:
        for job in range(jobs):
            summary = batch.score_to_parquet(spark, str(folder), str(scratch / f"job-{job}"), model)
            timings[f"job_{job + 1}_s"] = summary.seconds
    finally:
        spark.stop()
    return timings


def components(paths: list[Path], uri: str, sample: int = 512) -> dict[str, float]:
    """Milliseconds per image of each step, one process (ONNX Runtime at its default thread count)."""
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    from scoring import checks
    from scoring.imaging import decode_greyscale, resize_grey
    from scoring.runtime import Predictor
    from scoring.store import artefact_path, load_artefact

    paths = paths[:sample]
    data = [p.read_bytes() for p in paths]
    artefact = load_artefact(uri)
    started = time.perf_counter()
    greys = [decode_greyscale(d) for d in data]
    decode = time.perf_counter() - started
    started = time.perf_counter()
    for d, g in zip(data, greys, strict=True):
        checks.implausibility(d, g)
    check = time.perf_counter() - started
    size = artefact.input_size
    batch = np.stack([resize_grey(g, size) for g in greys])
    artefact.run(batch[:64])
    started = time.perf_counter()
    for start in range(0, len(batch), 64):
        artefact.run(batch[start:start + 64])
    model = time.perf_counter() - started
    predictor = Predictor(artefact)
    items = [(str(i), d) for i, d in enumerate(data)]
    started = time.perf_counter()
    predictor.predict(items)
    predictor_s = time.perf_counter() - started
    pyfunc = mlflow.pyfunc.load_model(str(artefact_path(uri).parents[1]))
    frame = pd.DataFrame({"image": data})
    started = time.perf_counter()
    pyfunc.predict(frame)
    pyfunc_s = time.perf_counter() - started
    n = len(paths)
    return {"images": n, "decode_ms": 1000 * decode / n, "checks_ms": 1000 * check / n,
            "model_ms": 1000 * model / n, "predictor_ms": 1000 * predictor_s / n,
            "pyfunc_ms": 1000 * pyfunc_s / n, "mean_file_bytes": round(sum(map(len, data)) / n)}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--model-uri", default=None, help="a registered pyfunc (default: a throwaway registration)")
    parser.add_argument("--artefact", type=Path, default=None, help="the ONNX serving artefact to register")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (a quick check)")
    parser.add_argument("--output", type=Path, default=PROJECT / "benchmarks" / "batch-results.json")
    args = parser.parse_args(argv)

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipeline import batch

    batch.quiet()
    with tempfile.TemporaryDirectory(prefix="batch-benchmark-") as scratch_name:
        scratch = Path(scratch_name)
        folder = scratch / "images"
        paths = extract(args.archive, folder, args.limit)
        n = len(paths)
        uri = args.model_uri
        if uri is None:
            artefact = args.artefact or next(p for p in (PROJECT / "models/registered/model.onnx",
                                                         PROJECT / "models/serving.onnx") if p.is_file())
            uri = register_throwaway(artefact, scratch / "store")
        env = {**os.environ, "PYTHONWARNINGS": f"ignore:{batch.PANDAS_WARNING}:FutureWarning"}
        print(f"{n} images, model {uri}, master {args.master}", flush=True)

        runs = []
        for repeat in range(args.repeats):
            load_before = load_average()
            cli_s = cli_end_to_end(folder, uri, scratch / "cli.csv", env)
            spark_s, spark_job_s = spark_end_to_end(folder, uri, scratch / "spark.parquet", args.master, env)
            cli_steady_s = cli_steady(paths, uri)
            session = spark_session_runs(folder, uri, scratch / f"session-{repeat}", args.master)
            runs.append({"cli_end_to_end_s": cli_s, "spark_end_to_end_s": spark_s, "spark_job_s": spark_job_s,
                         "cli_steady_s": cli_steady_s, **{f"spark_{k}": v for k, v in session.items()},
                         "load_average_before": load_before})
            print(json.dumps(runs[-1]), flush=True)
        parts = components(paths, uri)
        agreement = compare(scratch / "cli.csv", scratch / "spark.parquet")

    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    cli_e2e, spark_e2e = median("cli_end_to_end_s"), median("spark_end_to_end_s")
    cli_steady_s, spark_warm = median("cli_steady_s"), median("spark_job_2_s")
    results = {
        "images": n,
        "master": args.master,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "note": "shared with a background training job: absolute figures are pessimistic, "
                            "the CLI and Spark ran alternately under the same load"},
        "runs": runs,
        "cli": {"end_to_end_s": round(cli_e2e, 2), "end_to_end_images_per_s": round(n / cli_e2e, 1),
                "steady_s": round(cli_steady_s, 2), "steady_images_per_s": round(n / cli_steady_s, 1),
                "startup_s": round(cli_e2e - cli_steady_s, 2)},
        "spark": {"end_to_end_s": round(spark_e2e, 2), "end_to_end_images_per_s": round(n / spark_e2e, 1),
                  "cold_job_s": round(median("spark_job_1_s"), 2), "warm_job_s": round(spark_warm, 2),
                  "warm_images_per_s": round(n / spark_warm, 1),
                  "session_start_s": round(median("spark_session_start_s"), 2),
                  "fixed_overhead_s": round(spark_e2e - spark_warm, 2)},
        "ratio": {"end_to_end": round(cli_e2e / spark_e2e, 3), "steady": round(cli_steady_s / spark_warm, 3)},
        "per_image_overhead_ms": round(1000 * (spark_warm - cli_steady_s) / n, 3),
        "components_ms_per_image": {k: round(v, 3) for k, v in parts.items()},
        "agreement_with_cli": agreement,
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("cli", "spark", "ratio", "per_image_overhead_ms")}, indent=2))
    return 0


def compare(cli_csv: Path, spark_parquet: Path) -> dict[str, object]:
    """Whether Spark and the CLI gave every file the same label and probability."""
    import pandas as pd

    cli = pd.read_csv(cli_csv, keep_default_na=False)
    spark = pd.read_parquet(spark_parquet)
    spark["path"] = spark["path"].str.removeprefix("file:")
    merged = cli.merge(spark, on="path", how="outer", indicator=True)
    both = merged[merged["_merge"] == "both"]
    scored = both[both["probability"].notna()]
    difference = (pd.to_numeric(scored["probability_pneumonia"]) - scored["probability"]).abs()
    return {"rows_cli": len(cli), "rows_spark": len(spark), "matched": len(both),
            "same_label": int((both["label_x"].replace("", None).fillna("") == both["label_y"].fillna("")).sum()),
            "max_probability_difference": float(difference.max()) if len(difference) else None}


if __name__ == "__main__":
    sys.exit(main())
