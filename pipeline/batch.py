"""Batch scoring on Apache Spark: `python -m pipeline.batch INPUT --output OUT [--master local[2]]
[--model-uri URI]`. Writes Parquet with path, the prediction record (as the predict CLI's columns: probability
of pneumonia, label, error, triage, subtype, probability that it is viral, note), threshold, model name and
version.

INPUT is a folder (searched recursively) or a glob of image files, read with Spark's `binaryFile` source,
or a Parquet table with a binary column of image file bytes (`--format parquet`, or a path ending in
`.parquet`). Every row goes through `mlflow.pyfunc.spark_udf` on the registered MLflow model (the pyfunc
around the ONNX serving artefact, `scoring.pyfunc`), so Spark accepts, refuses and labels files exactly as
the app and `python -m pipeline.predict` do. A bad file becomes a row with an error, never a failed job:
undecodable or implausible images are refused by the model; files Spark does not read (empty, over the
50 MB limit, unreadable, vanished) are added as error rows after the job.

It runs unchanged in local mode (`--master local[2]`), on a cluster (`--master spark://HOST:7077`), or under
`spark-submit` (which sets the master; then omit --master). A `models:/NAME@ALIAS` URI is resolved once, on
the driver, to a version: every executor scores with that version even if the alias moves meanwhile.
On a cluster the executors need the model's Python requirements (onnxruntime, pillow, pydicom, pandas,
mlflow: `pip install .[cpu]` or the driver's image), or `--env-manager uv` for MLflow to build them; the
model, with its serving code, is shipped to them by Spark. Needs the `spark` extra and Java 17 or later.

Exit status: 0 all files scored; 1 some rows carry an error; 2 no usable model, no input, or Spark could
not start.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scoring import wording
from scoring.locations import TrackingUnavailableError, brief, configure_tracking, production_uri
from scoring.logs import setup_logging
from scoring.pixels import IMAGE_SUFFIXES, MAX_FILE_BYTES
from scoring.runtime import RECORD_FIELDS, RECORD_TYPES
from scoring.store import PYFUNC_ARTEFACT, ModelUnavailableError, download_registered, model_uri_help

log = logging.getLogger("pipeline.batch")

OUTPUT_COLUMNS = ["path", *RECORD_FIELDS, "threshold", "model_name", "model_version"]
# Files the folder reader scores: image extensions as in the predict CLI, plus names without an
# extension (scanners often write DICOM files without one). Hidden files are skipped.
IMAGE_NAME_PATTERN = rf"(?i)^[^.].*\.({'|'.join(IMAGE_SUFFIXES)})$|^[^.]+$"
# Spark packs small files into one task up to this many bytes, counting each file as `openCostInBytes`
# at least; the cost is set so that a task holds about --images-per-task small files.
MAX_PARTITION_BYTES = 128 * 1024 * 1024
DEFAULT_IMAGES_PER_TASK = 256
RESULT_TYPE = ", ".join([*(f"{name} {RECORD_TYPES[name]}" for name in RECORD_FIELDS), "threshold double"])
LOCAL_JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
PANDAS_WARNING = "PySpark does not yet fully support pandas"
EXIT_OK, EXIT_SOME_ERRORS, EXIT_UNUSABLE = 0, 1, 2


class BatchError(RuntimeError):
    """A batch that cannot start (no model, no input, output exists, no Spark), with what to do."""


@dataclass(frozen=True)
class ScoringModel:
    """The model the executors run: a local MLflow model folder and what the registry says it is."""

    local_path: str
    uri: str
    name: str
    version: str
    threshold: float


@dataclass(frozen=True)
class Summary:
    total: int
    scored: int
    errors: int
    labels: dict[str, int]
    top_errors: list[tuple[str, int]]
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# The model


def resolve_model(uri: str | None, scratch: Path) -> ScoringModel:
    """Download the MLflow model behind `uri` (default: production) once, on the driver, pinned to a version."""
    from scoring.runtime import ArtefactLoadError, ServingArtefact

    uri = uri or production_uri()
    registered_name = registered_version = None
    if uri.startswith("models:/"):
        registered = download_registered(uri, scratch)
        registered_name, registered_version, pinned, local = (registered.name, registered.version, registered.uri,
                                                              registered.folder)
    else:
        pinned, local = uri, _download_unregistered(uri, scratch)
    onnx = local / PYFUNC_ARTEFACT
    try:
        decision = ServingArtefact.from_file(onnx).decision
    except (OSError, ArtefactLoadError) as error:
        raise ModelUnavailableError(
            f"{uri} is not this project's registered pyfunc (no readable artifacts/model.onnx: {error}); register "
            "one with `make repro`") from error
    return ScoringModel(local_path=str(local), uri=pinned, name=registered_name or decision.model_name,
                        version=registered_version or str(decision.model_version or "unregistered"),
                        threshold=float(decision.threshold))


def _download_unregistered(uri: str, scratch: Path) -> Path:
    """An MLflow model folder behind a runs:/ URI or a local path, downloaded into `scratch`."""
    import mlflow

    if "://" in uri:
        configure_tracking()  # runs:/ and mlflow-artifacts:/ URIs go through the tracking store
    elif not Path(uri).exists():
        raise ModelUnavailableError(f"{uri}: neither a models:/ URI nor an existing MLflow model folder")
    elif not (Path(uri) / "MLmodel").is_file():
        raise ModelUnavailableError(
            f"{uri} is not an MLflow model folder (no MLmodel file): Spark scores registered models; score an "
            "exported model folder with `python -m pipeline.predict --model-uri`")
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch)))
    except Exception as error:  # MLflow surfaces missing artefacts as many exception types
        raise ModelUnavailableError(f"{uri}: the model's files cannot be downloaded ({brief(error, 400)})") from error


# --------------------------------------------------------------------------------------------------
# Spark


def start_spark(master: str | None, app_name: str = "pneumonia-batch-scoring"):
    """A SparkSession: on `master` if given, else where spark-submit or the Spark config says, else local[*]."""
    try:
        from pyspark import SparkConf
        from pyspark.sql import SparkSession
    except ImportError as error:
        raise BatchError("pyspark is not installed: install the `spark` extra (`make setup-scale`, or "
                         "`uv sync --extra cpu --extra spark`)") from error
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    # Without --master, spark-submit's --master or spark.master in the Spark config, Spark runs local[*].
    # Under spark-submit (which starts the JVM itself) none of the start-up settings below would apply.
    launching_local = ("PYSPARK_GATEWAY_PORT" not in os.environ
                       and (master or SparkConf().get("spark.master", "local")).startswith("local"))
    if launching_local:
        # Python workers run this interpreter (on a cluster, spark.pyspark.python decides) and inherit this
        # environment; the driver listens on loopback only.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYTHONWARNINGS", f"ignore:{PANDAS_WARNING}:FutureWarning")
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = builder.config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
        if not SparkConf().contains("spark.driver.extraJavaOptions"):
            # In local mode the one JVM only lists, reads and writes files: the quick JIT tier and the serial
            # collector halve its start-up on two cores (measured: 13 s -> 6 s, first job 7 s -> 3 s).
            builder = builder.config("spark.driver.extraJavaOptions", LOCAL_JVM_OPTIONS)
    try:
        spark = builder.getOrCreate()
    except Exception as error:  # PySparkRuntimeError (no Java, JVM died at start) and friends
        raise BatchError(f"Spark could not start ({brief(error, 400)}); Spark 4 needs Java 17 or later on PATH or "
                         "in JAVA_HOME (see docs/scaling.md)") from error
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def configure_reads(spark, images_per_task: int) -> None:
    """Small tasks of about `images_per_task` files, bounded in bytes; unreadable files skipped (and added
    back as error rows afterwards), so that one bad file never fails the job."""
    # Files over the size limit are never read at all: `read_input` filters them on their listed length
    # (binaryFile applies that filter before reading content) and they come back as error rows too.
    conf = {
        "spark.sql.files.maxPartitionBytes": str(MAX_PARTITION_BYTES),
        "spark.sql.files.openCostInBytes": str(max(1, MAX_PARTITION_BYTES // max(1, images_per_task))),
        "spark.sql.files.ignoreCorruptFiles": "true",
        "spark.sql.files.ignoreMissingFiles": "true",
        # Arrow batches to the Python workers: bounded memory however large a partition is.
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(max(1, images_per_task)),
    }
    for key, value in conf.items():
        spark.conf.set(key, value)


def is_parquet(source: str, fmt: str) -> bool:
    if fmt != "auto":
        return fmt == "parquet"
    if source.rstrip("/").lower().endswith(".parquet"):
        return True
    local = Path(source)
    return local.is_dir() and any(local.glob("*.parquet"))


@dataclass(frozen=True)
class Input:
    """What to score (`frame`: path, image bytes) and, for files, what was listed to check it against."""

    frame: Any
    listed: list[str] | None = None  # every image file listed (paths as Spark writes them)
    lengths: Any = None  # path, length of the image files Spark's scan sees (it drops empty files)
    skipped: int = 0  # files that are not images by name


def spark_path(listed: str) -> str:
    """A listed file as the binaryFile source names it in its `path` column (file:/x, not file:///x)."""
    return "file:/" + listed.removeprefix("file:///") if listed.startswith("file:///") else listed


def read_input(spark, source: str, fmt: str, image_column: str | None, path_column: str) -> Input:
    from pyspark.sql import functions as F

    if is_parquet(source, fmt):
        table = spark.read.parquet(source)
        column = image_column or next((c for c in ("image", "content") if c in table.columns), None)
        if column is None or column not in table.columns:
            raise BatchError(f"{source} has no column {column or 'image or content'} of image bytes "
                             f"(columns: {', '.join(table.columns)}); name it with --image-column")
        path = (F.col(path_column).cast("string") if path_column in table.columns
                else F.concat(F.lit("row-"), F.monotonically_increasing_id().cast("string")))
        return Input(table.select(path.alias("path"), F.col(column).alias("image")))
    found = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(source)
    # The listing Spark made on the driver (empty files included, which its scans silently drop).
    files = [spark_path(path) for path in found.inputFiles()]
    listed = [path for path in files if re.search(IMAGE_NAME_PATTERN, path.rsplit("/", 1)[-1])]
    images = found.filter(F.element_at(F.split("path", "/"), -1).rlike(IMAGE_NAME_PATTERN))
    # Files over the size limit are never read: binaryFile applies a filter on `length` before reading.
    readable = images.filter(F.col("length") <= MAX_FILE_BYTES)
    return Input(readable.select("path", F.col("content").alias("image")), listed,
                 images.select("path", "length"), len(files) - len(listed))


def score(spark, frame, model: ScoringModel, env_manager: str = "local"):
    """The scored DataFrame, in OUTPUT_COLUMNS (one row per input row, in the input's partitions)."""
    import mlflow.pyfunc
    from pyspark.sql import functions as F

    udf = mlflow.pyfunc.spark_udf(spark, model.local_path, env_manager=env_manager, result_type=RESULT_TYPE)
    result = frame.withColumn("result", udf(F.col("image")))
    # spark_udf casts a string field holding some None values with astype(str) (None -> "None") and a
    # double field with astype(float64) (None -> NaN): back to nulls. Labels are class names and errors
    # sentences, never the bare word.
    def nullable(name: str):
        value, kind = F.col(f"result.{name}"), RECORD_TYPES[name]
        missing = F.isnan(value) if kind == "double" else value == "None"
        return F.when(missing, F.lit(None).cast(kind)).otherwise(value).alias(name)

    return result.select(
        "path", *(nullable(name) for name in RECORD_FIELDS), "result.threshold",
        F.lit(model.name).alias("model_name"), F.lit(model.version).alias("model_version"))


def add_missing(spark, found: Input, output: str, model: ScoringModel) -> int:
    """Listed image files without a row (too large to read, empty, unreadable or vanished) as error rows,
    worded as the predict path words them (`scoring.wording`). They are few: collected on the driver."""
    listed = spark.createDataFrame([(path,) for path in found.listed], "path string")
    written = spark.read.parquet(output).select("path")
    missing = listed.join(written, on="path", how="left_anti").join(found.lengths, on="path", how="left").collect()
    if not missing:
        return 0
    rows = [(row["path"], *(missing_error(row["length"]) if name == "error" else None for name in RECORD_FIELDS),
             model.threshold, model.name, model.version) for row in missing]
    schema = ", ".join(["path string", *(f"{name} {RECORD_TYPES[name]}" for name in RECORD_FIELDS),
                        "threshold double", "model_name string", "model_version string"])
    spark.createDataFrame(rows, schema).coalesce(1).write.mode("append").parquet(output)
    return len(rows)


def missing_error(length: int | None) -> str:
    """Why a listed file has no row: Spark's scan drops empty files (and vanished ones), skips unreadable
    ones, and `read_input` never reads one over the size limit."""
    if length is None:
        return wording.EMPTY_OR_GONE
    if length > MAX_FILE_BYTES:
        return wording.too_large(length, MAX_FILE_BYTES)
    return wording.UNREADABLE


def summarise(spark, output: str, seconds: float) -> Summary:
    """Counts by label and by error, from what was written (one small job)."""
    rows = spark.read.parquet(output).groupBy("label", "error").count().collect()
    labels: dict[str, int] = {}
    errors: dict[str, int] = {}
    for row in rows:
        if row["label"] is not None:
            labels[row["label"]] = labels.get(row["label"], 0) + row["count"]
        else:
            reason = row["error"] or "no result"
            errors[reason] = errors.get(reason, 0) + row["count"]
    scored, failed = sum(labels.values()), sum(errors.values())
    top = sorted(errors.items(), key=lambda item: (-item[1], item[0]))[:5]
    return Summary(total=scored + failed, scored=scored, errors=failed, labels=dict(sorted(labels.items())),
                   top_errors=top, seconds=seconds)


def score_to_parquet(spark, source: str, output: str, model: ScoringModel, *, fmt: str = "auto",
                     image_column: str | None = None, path_column: str = "path",
                     images_per_task: int = DEFAULT_IMAGES_PER_TASK, overwrite: bool = False,
                     env_manager: str = "local") -> Summary:
    """Score `source` into the Parquet folder `output` on a running session; the summary read back from it."""
    configure_reads(spark, images_per_task)
    found = read_input(spark, source, fmt, image_column, path_column)
    if found.skipped:
        log.info("%d files under %s are not images by name: skipped", found.skipped, source)
    if found.listed is not None and not found.listed:
        raise BatchError(f"no image files found at {source}")
    started = time.perf_counter()
    score(spark, found.frame, model, env_manager).write.mode("overwrite" if overwrite else "errorifexists").parquet(output)
    summary = summarise(spark, output, time.perf_counter() - started)
    if found.listed is not None and summary.total < len(found.listed):
        added = add_missing(spark, found, output, model)
        log.warning("%d files were empty, too large or unreadable: error rows added", added)
        summary = summarise(spark, output, time.perf_counter() - started)
    return summary


def run(args: argparse.Namespace) -> tuple[Summary, ScoringModel]:
    output = str(args.output)
    if "://" not in output and Path(output).exists() and not args.overwrite:
        raise BatchError(f"{output} exists: pass --overwrite to replace it")
    with tempfile.TemporaryDirectory(prefix="pneumonia-batch-") as scratch:
        model = resolve_model(args.model_uri, Path(scratch))
        log.info("scoring with %s version %s (threshold %.4f) from %s", model.name, model.version,
                 model.threshold, model.uri)
        spark = start_spark(args.master)
        try:
            summary = score_to_parquet(spark, args.input, output, model, fmt=args.format,
                                       image_column=args.image_column, path_column=args.path_column,
                                       images_per_task=args.images_per_task, overwrite=args.overwrite,
                                       env_manager=args.env_manager)
        finally:
            spark.stop()
    return summary, model


def report(summary: Summary, model: ScoringModel, output: str) -> str:
    labels = ", ".join(f"{label} {count}" for label, count in summary.labels.items()) or "none"
    lines = [(f"scored {summary.scored} of {summary.total} files in {summary.seconds:.1f} s "
             f"({summary.images_per_second:.1f} files/s) with {model.name} version {model.version} "
             f"(threshold {model.threshold:.4f}): {labels}; {summary.errors} not scored"),
             f"wrote {output}"]
    lines += [f"  not scored ({count}): {error}" for error, count in summary.top_errors]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="a folder or glob of image files, or a Parquet table of image bytes")
    parser.add_argument("--output", required=True, help="the Parquet folder to write")
    parser.add_argument("--master", default=None,
                        help="Spark master: local[2], spark://HOST:7077... (default: as spark-submit or the "
                             "Spark config set it, else local[*])")
    parser.add_argument("--model-uri", default=None, help=model_uri_help(
        forms="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or an MLflow model folder"))
    parser.add_argument("--format", choices=["auto", "files", "parquet"], default="auto",
                        help="how to read INPUT (auto: Parquet if it ends in .parquet or holds .parquet files)")
    parser.add_argument("--image-column", default=None, help="Parquet input: the column of image bytes "
                                                             "(default: image, else content)")
    parser.add_argument("--path-column", default="path", help="Parquet input: the column naming each row "
                                                              "(default: path; row numbers if absent)")
    parser.add_argument("--images-per-task", type=int, default=DEFAULT_IMAGES_PER_TASK,
                        help="about this many small files per Spark task (default: %(default)s)")
    parser.add_argument("--env-manager", choices=["local", "uv", "virtualenv", "conda"], default="local",
                        help="Python environment of the executors: local (default: the executors' own, with "
                             "this project's packages) or one MLflow rebuilds from the model's requirements "
                             "(needs network access on the executors)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return parser.parse_args(argv)


def quiet() -> None:
    """Spark and MLflow chatter that says nothing to act on here."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # pyspark 4.x warns on every import that it does not "fully support" pandas 3 (the Arrow path used
    # here is covered by tests/test_batch.py).
    warnings.filterwarnings("ignore", message=PANDAS_WARNING, category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    quiet()
    for noisy in ("py4j", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = parse_args(argv)

    try:
        summary, model = run(args)
    except (BatchError, ModelUnavailableError, TrackingUnavailableError) as error:
        log.error("%s", brief(error, 400))
        return EXIT_UNUSABLE
    except Exception as error:
        if _is_no_input(error):
            log.error("no files found at %s", args.input)
            return EXIT_UNUSABLE
        raise
    if summary.total == 0:
        log.error("no image files found at %s", args.input)
        return EXIT_UNUSABLE
    print(report(summary, model, str(args.output)))
    return EXIT_SOME_ERRORS if summary.errors else EXIT_OK


def _is_no_input(error: BaseException) -> bool:
    """Spark's AnalysisException for a path that matches nothing (PATH_NOT_FOUND)."""
    text = str(error)
    return type(error).__name__ == "AnalysisException" and ("PATH_NOT_FOUND" in text or "does not exist" in text)



if __name__ == "__main__":
    sys.exit(main())
