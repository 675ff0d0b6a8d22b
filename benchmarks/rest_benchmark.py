"""Throughput and memory of the app's REST endpoint (`POST /api/v1/predict`, serving/rest.py): prints a
Markdown table and writes JSON.

    python benchmarks/rest_benchmark.py [--model-uri URI | --stand-in] [--clients 16] [--requests 10000]
                                        [--warmup 3000] [--time-limit-s 900] [--output benchmarks/rest-results.json]

Starts `python app.py` on a free loopback port (its own process group, stopped as one at the end). Each of
`--clients` threads holds one keep-alive HTTP connection and posts one X-ray per request (the example images
in rotation; each multipart body built once, before the timed part), back to back. After `--warmup`
requests the app's resident memory is the baseline; then `--requests` requests are timed. A request
succeeds when it answers 200 with one scored result for the file sent; anything else is a failure, by kind.
Memory is sampled every second; growth is from the baseline to the end.

Before the app starts and again after it stopped, the same model's bare serving artefact is timed in this
process, one image a call (its ONNX graph in an ONNX Runtime session with the runtime's default settings,
threads spinning between calls, on an example already decoded and resized), back to back for
`--bare-seconds`: the faster of the two is the ceiling the endpoint is measured against (this shared
machine's single runs of it vary by up to a quarter).

Targets (issues #19 and model quality IV): the endpoint reaches >= 70% of the bare artefact's one-image-a-call
throughput, with no failure from 16 clients on 2 cores, resident memory growing <= 5% over 10,000 requests.
Clients and app share the machine's cores, so throughput includes the clients' own CPU cost. `--stand-in`
serves an untrained model of the configured architecture (params.yaml; built with TensorFlow, so the dev
environment) where no model is registered: the same work per image, meaningless scores.
Exit status: 0 targets met, 1 a target missed, 3 the time limit cut the run short.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

# Run as a script (`python benchmarks/rest_benchmark.py`), so benchmarks/ is on sys.path.
from app_benchmark import (
    APP,
    EXAMPLES,
    ROOT,
    free_port,
    percentiles,
    resident_mb,
    row,
    stop,
    verdict,
    wait_until_ready,
)

from serving.rest import FIELD, PATH

DEFAULT_OUTPUT = ROOT / "benchmarks" / "rest-results.json"
TARGET_SHARE_OF_BARE = 0.70
BARE_SECONDS = 20.0
TARGET_FAILED = 0
TARGET_RSS_GROWTH_PCT = 5.0
REQUEST_TIMEOUT_S = 60.0
RSS_SAMPLE_S = 1.0
# Baseline and final memory are both read this long after their load ended: the same state, at rest.
SETTLE_S = 2.0
# The train params that shape the network (tests.helpers.tiny_keras_model's overrides).
STAND_IN_ARCHITECTURE = ("backbone", "image_size", "filters", "convs_per_block", "residual", "normalization",
                         "dropout", "crop", "stem_filters")


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """One file in the field `files`: the body and its Content-Type."""
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{FIELD}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def classify(status: int, payload: bytes, name: str) -> str:
    """"ok", or the kind of failure."""
    if status != 200:
        return f"HTTP {status}"
    try:
        results = json.loads(payload)["results"]
    except (ValueError, KeyError, TypeError):
        return "malformed answer"
    if len(results) != 1 or results[0].get("name") != name:
        return "wrong results"
    return "ok" if results[0].get("probability_pneumonia") is not None else "not scored"


class Run:
    """Shared counters of one timed phase: a request number is taken before each request."""

    def __init__(self, total: int, deadline: float) -> None:
        self.total, self.deadline = total, deadline
        self.started = 0
        self.outcomes: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.lock = threading.Lock()

    def take(self) -> int | None:
        with self.lock:
            if self.started >= self.total or time.monotonic() > self.deadline:
                return None
            self.started += 1
            return self.started

    def record(self, outcome: str, seconds: float) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            self.latencies.append(seconds)


def client(port: int, bodies: list[tuple[str, bytes, str]], run: Run) -> None:
    """One keep-alive connection, posting until the run is complete (reconnecting after an error)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    while (number := run.take()) is not None:
        name, body, content_type = bodies[number % len(bodies)]
        started = time.perf_counter()
        try:
            connection.request("POST", PATH, body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            outcome = classify(response.status, response.read(), name)
        except (OSError, http.client.HTTPException) as error:
            outcome = type(error).__name__
            connection.close()
        run.record(outcome, time.perf_counter() - started)
    connection.close()


def load(port: int, bodies: list[tuple[str, bytes, str]], clients: int, requests: int, deadline: float) -> Run:
    run = Run(requests, deadline)
    threads = [threading.Thread(target=client, args=(port, bodies, run), daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return run


class MemorySampler(threading.Thread):
    """The app's resident memory every RSS_SAMPLE_S, until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples = pid, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(RSS_SAMPLE_S):
            self.samples.append(resident_mb(self.pid))


def stand_in_model(folder: Path) -> str:
    """An untrained model of the configured architecture (sure that every image is upright, as a trained
    one is of an upright X-ray), exported as the app serves it."""
    from pipeline.artefact import build
    from pipeline.export import write_bundle
    from scoring.decision import Decision

    sys.path.insert(0, str(ROOT))  # tests/ is not installed
    from tests.helpers import project_params, tiny_keras_model

    params = project_params()
    architecture = {name: getattr(params.train, name) for name in STAND_IN_ARCHITECTURE}
    size = params.preprocess.image_size
    decision = Decision(threshold=0.5, threshold_rule="youden", input_size=size, model_name="stand-in (untrained)",
                        model_version="0", training_commit="none", trained_at="1970-01-01T00:00:00+00:00")
    return str(write_bundle(build(tiny_keras_model(input_size=size, orientation=0, **architecture), decision),
                            folder))


def bare_throughput(model_uri: str | None, seconds: float) -> dict[str, Any]:
    """The serving artefact's graph alone, one image a call, at ONNX Runtime's defaults (its fastest single
    calls): images/s and the calls' latency."""
    import numpy as np
    import onnxruntime

    from scoring.decision import INPUT_NAME
    from scoring.imaging import decode_greyscale, resize_grey
    from scoring.store import load_artefact

    artefact = load_artefact(model_uri)
    session = onnxruntime.InferenceSession(artefact.onnx_bytes, providers=["CPUExecutionProvider"])
    image = resize_grey(decode_greyscale(EXAMPLES[0].read_bytes()), artefact.input_size)
    feed = {INPUT_NAME: image.astype(np.float32)[np.newaxis, ..., np.newaxis]}
    session.run(None, feed)  # the session's first run allocates its buffers
    latencies, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        call = time.perf_counter()
        session.run(None, feed)
        latencies.append(time.perf_counter() - call)
    return {"images_per_s": len(latencies) / (time.perf_counter() - started), "calls": len(latencies),
            "latency": percentiles(latencies), "model_bytes": len(artefact.onnx_bytes)}


def measure(model_uri: str | None, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    bodies = [(path.name, *multipart(path.name, path.read_bytes())) for path in EXAMPLES]
    command = [sys.executable, str(APP), *(["--model-uri", model_uri] if model_uri else []), "--host", "127.0.0.1",
               "--port", str(port)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "MLFLOW_DISABLE_TELEMETRY": "true"}
    deadline = args.started + args.time_limit_s
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would stall the app
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            if wait_until_ready(f"http://127.0.0.1:{port}/", process, time.perf_counter()) is None:
                log.seek(0)
                raise RuntimeError(f"the app did not start:\n{log.read().decode(errors='replace')[-2000:]}")
            warmup = load(port, bodies, args.clients, args.warmup, deadline)
            time.sleep(SETTLE_S)
            baseline = resident_mb(process.pid)
            sampler = MemorySampler(process.pid)
            sampler.start()
            started = time.perf_counter()
            timed = load(port, bodies, args.clients, args.requests, deadline)
            elapsed = time.perf_counter() - started
            sampler.done.set()
            time.sleep(SETTLE_S)
            final = resident_mb(process.pid)
        finally:
            stop(process)
    done = sum(timed.outcomes.values())
    return {
        "clients": args.clients, "requests": done, "requests_asked": args.requests, "cut_short": done < args.requests,
        "warmup_outcomes": dict(warmup.outcomes), "outcomes": dict(timed.outcomes), "seconds": elapsed,
        "images_per_s": timed.outcomes["ok"] / elapsed, "latency": percentiles(timed.latencies),
        "rss_baseline_mb": baseline, "rss_final_mb": final, "rss_peak_mb": max(sampler.samples + [final]),
        "rss_samples_mb": [round(sample, 1) for sample in sampler.samples],
        "rss_growth_pct": 100.0 * (final - baseline) / baseline,
    }


def targets_met(result: dict[str, Any]) -> dict[str, bool]:
    failed = result["requests"] - result["outcomes"].get("ok", 0)
    return {"images_per_s": result["share_of_bare"] >= TARGET_SHARE_OF_BARE, "failed": failed <= TARGET_FAILED,
            "rss_growth": result["rss_growth_pct"] <= TARGET_RSS_GROWTH_PCT}


def markdown(result: dict[str, Any]) -> str:
    met, latency = result["targets_met"], result["latency"]
    failed = result["requests"] - result["outcomes"].get("ok", 0)
    return "\n".join([
        row("measurement", "value", "target", "met"), row("---", "---", "---", "---"),
        row("bare artefact, one image a call", f"{result['bare']['images_per_s']:.1f} images/s "
            f"(p50 {result['bare']['latency']['p50_ms']:.1f} ms)", "", ""),
        row("endpoint", f"{result['images_per_s']:.1f} images/s ({100 * result['share_of_bare']:.0f}% of bare)",
            f">= {100 * TARGET_SHARE_OF_BARE:.0f}% of bare", verdict(met["images_per_s"])),
        row("failed requests", f"{failed} of {result['requests']}", f"{TARGET_FAILED}", verdict(met["failed"])),
        row("latency p50 / p95", f"{latency['p50_ms']:.0f} / {latency['p95_ms']:.0f} ms", "", ""),
        row("resident memory", f"{result['rss_baseline_mb']:.0f} -> {result['rss_final_mb']:.0f} MB "
            f"({result['rss_growth_pct']:+.1f}%)", f"<= +{TARGET_RSS_GROWTH_PCT:.0f}%", verdict(met["rss_growth"])),
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model-uri", default=None, help="what the app serves (default: its own default)")
    model.add_argument("--stand-in", action="store_true", help="serve an untrained model of the configured "
                                                               "architecture (needs TensorFlow)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10_000, help="timed requests, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3000,
                        help="untimed requests first: with two scoring threads memory settles within 3,000")
    parser.add_argument("--time-limit-s", type=float, default=900.0,
                        help="the whole run, model and app start included: past it no new request starts")
    parser.add_argument("--bare-seconds", type=float, default=BARE_SECONDS,
                        help="how long the bare artefact is timed, one image a call")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return parser.parse_args(argv)


def stop_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(143)  # so that the app's process group is stopped on the way out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.started = time.monotonic()
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    with tempfile.TemporaryDirectory() as folder:
        model_uri = stand_in_model(Path(folder) / "stand-in") if args.stand_in else args.model_uri
        before = bare_throughput(model_uri, args.bare_seconds)
        result = measure(model_uri, args)
        after = bare_throughput(model_uri, args.bare_seconds)
    bare = max(before, after, key=lambda run: run["images_per_s"])
    result.update(bare=bare, bare_runs_images_per_s=[before["images_per_s"], after["images_per_s"]],
                  share_of_bare=result["images_per_s"] / bare["images_per_s"])
    result.update(model="stand-in (untrained, configured architecture)" if args.stand_in else model_uri or "default",
                  machine={"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version()},
                  targets_met={})
    result["targets_met"] = targets_met(result)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    if result["cut_short"]:
        return 3
    return 0 if all(result["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
