"""Load-test the running app over HTTP with concurrent `gradio_client` clients; prints a Markdown table and
writes JSON.

    python benchmarks/load_benchmark.py [--model-uri URI] [--clients 32] [--requests 50] [--soak 2000]
                                        [--output benchmarks/load-results.json] [--time-limit-min 15]

Starts `python app.py` on a free loopback port (in its own process group, stopped as one at the end), then:
- warm-up: `WARMUP_REQUESTS` `/predict` calls spread over the clients (not timed), then the app's resident
  memory is taken as the baseline. As many as the events Gradio's queue keeps for its monitoring summary
  (`serving.gradio_workarounds.ANALYTICS_EVENTS_KEPT`): until then that bounded record is still filling;
- phase 1 (load): `--clients` threads, one `gradio_client.Client` each (created before the timed part),
  each making `--requests` `/predict` calls back to back with the example images in rotation. Every answer
  is classified: a success (a decision came back), a "Queue is full" refusal that the client reported
  clearly (counted as handled, with its message), or a failure by kind (timeout, connection error, HTTP
  status, app error, malformed answer, a heatmap PNG that arrived incomplete). Latency is the client's wall
  time per call (upload, queue, scoring, class-activation map, download of the heatmap);
- phase 2 (memory): the same clients make the remaining calls until `--soak` calls after the warm-up have
  been answered (phase 1 + top-up, whatever their outcome), then memory is taken again; growth is measured
  from the warm-up baseline.

Everything stays on 127.0.0.1. Each call is bounded (`REQUEST_TIMEOUT_S`) and the whole run is bounded
(`--time-limit-min`): past it no new call starts, the app is stopped, what was measured is written and the
exit status is 3 (143 after SIGTERM; 1 when a target is missed). Client and app share the machine's cores,
so throughput includes the clients' own CPU cost.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script (`python benchmarks/load_benchmark.py`), so benchmarks/ is on sys.path.
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

from scoring.store import model_uri_help
from serving.gradio_workarounds import ANALYTICS_EVENTS_KEPT

EXPORTED_MODEL = ROOT / "exports" / "pneumonia-cnn"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "load-results.json"

TARGET_FAILED = 0
TARGET_RSS_GROWTH_PCT = 5.0  # over 2,000 requests (scoring-core issue)
WARMUP_REQUESTS = ANALYTICS_EVENTS_KEPT
REQUEST_TIMEOUT_S = 120.0  # one call, queueing included; far above what a full queue should take
RSS_SAMPLE_S = 1.0
PROGRESS_S = 15.0
JOIN_GRACE_S = 30.0  # after the deadline, how long stuck worker threads get before the app is stopped
QUEUE_FULL_TEXT = "queue is full"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"
SERVER_TIMING = re.compile(r"scored (\d+) of (\d+) files in (\d+) ms(?: \(([\d.]+) ms CPU\))?")


class TimeLimitExceeded(RuntimeError):
    pass


class Stopped(RuntimeError):
    """SIGTERM from outside: the run unwinds like a time-out, so the app is stopped and JSON written."""


@dataclass
class Call:
    """One `/predict` call as the client saw it."""

    phase: str
    client: int
    latency_s: float
    outcome: str  # "ok", "queue_full" (handled: the client said so) or a failure kind
    message: str = ""


@dataclass
class Progress:
    """Shared between worker threads, the memory sampler and the progress printer."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: list[Call] = field(default_factory=list)
    abort: threading.Event = field(default_factory=threading.Event)
    phase: str = ""

    def add(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)

    def answered(self) -> int:
        with self.lock:
            return len(self.calls)

    def served(self) -> int:
        with self.lock:
            return sum(c.outcome == "ok" for c in self.calls)

    def of(self, phase: str | None) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if phase is None or c.phase == phase]

    def counts(self, phase: str) -> tuple[int, int]:
        mine = self.of(phase)
        return len(mine), sum(c.outcome not in ("ok", "queue_full") for c in mine)


def rss_mb(pid: int) -> float | None:
    """`resident_mb`, or None once the app has gone (so a crashed app is reported, not a traceback)."""
    try:
        return resident_mb(pid)
    except Exception:  # noqa: BLE001 (psutil.NoSuchProcess, or /proc vanishing between two reads)
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of the app (and any children), or None without psutil or without the app."""
    try:
        import psutil

        process = psutil.Process(pid)
        return sum(t.user + t.system for t in
                   (p.cpu_times() for p in [process, *process.children(recursive=True)]))
    except Exception:  # noqa: BLE001 (no psutil, or the app has gone)
        return None


def own_cpu_seconds() -> float:
    """CPU time of this process: the clients' threads (the app's is not counted until it is reaped)."""
    times = os.times()
    return times.user + times.system


def default_model_uri() -> str:
    """The exported bundle if present (no MLflow import at app start-up), else the production alias."""
    from scoring.store import ARTEFACT_NAME, production_uri

    return str(EXPORTED_MODEL) if (EXPORTED_MODEL / ARTEFACT_NAME).is_file() else production_uri()


def classify(error: BaseException) -> tuple[str, str]:
    """(outcome, message) for an exception from a call. Only an explicit "Queue is full" is handled."""
    import httpx
    from gradio_client.exceptions import AppError

    message = f"{type(error).__name__}: {error}".strip()
    if QUEUE_FULL_TEXT in str(error).lower():
        return "queue_full", message
    if isinstance(error, httpx.TimeoutException):
        return f"HTTP timeout ({type(error).__name__})", message
    if isinstance(error, httpx.HTTPStatusError):
        return f"HTTP {error.response.status_code}", message
    if isinstance(error, httpx.TransportError):
        return f"connection error ({type(error).__name__})", message
    if isinstance(error, TimeoutError):  # concurrent.futures.TimeoutError is this class on 3.11
        return f"no answer within {REQUEST_TIMEOUT_S:.0f} s", message
    if isinstance(error, concurrent.futures.CancelledError):
        return "cancelled (stream closed)", message
    if isinstance(error, AppError):
        return "app error", message
    return f"other ({type(error).__name__})", message


def answer_problem(answer: Any) -> str | None:
    """Why a `/predict` answer is not a usable result, or None: the app's five outputs (result, heatmap,
    table, status, details), a result text, and a decision with its probability in the structured result
    (the prediction record, `scoring.runtime.RECORD_FIELDS`)."""
    if not isinstance(answer, (tuple, list)) or len(answer) != 5:
        return f"expected 5 outputs, got {type(answer).__name__} of {len(answer) if isinstance(answer, (tuple, list)) else 1}"
    details = answer[4] if isinstance(answer[4], dict) else {}
    if not any(isinstance(row.get("probability_pneumonia"), float) and row.get("label") in ("NORMAL", "PNEUMONIA")
               for row in details.get("results", [])):
        return f"no decision in the structured result: {str(answer[4])[:120]}"
    if not isinstance(answer[0], str) or not answer[0].strip():
        return f"no result text: {str(answer[0])[:120]}"
    # The heatmap as downloaded by the client: a complete PNG, not a file cut short while it was served.
    heatmap = Path(answer[1]) if isinstance(answer[1], (str, Path)) else None
    data = heatmap.read_bytes() if heatmap is not None and heatmap.is_file() else b""
    if not (data.startswith(PNG_SIGNATURE) and data.endswith(PNG_END)):
        return f"heatmap missing or not a complete PNG ({len(data)} bytes)"
    return None


def one_call(client: Any, image: Path, deadline: float) -> tuple[str, str, float]:
    from gradio_client import handle_file

    started = time.perf_counter()
    job = None
    try:
        job = client.submit(handle_file(str(image)), api_name="/predict")
        answer = job.result(timeout=max(1.0, min(REQUEST_TIMEOUT_S, deadline - time.monotonic())))
    except BaseException as error:  # noqa: BLE001 (every failure is classified and counted, none is lost)
        elapsed = time.perf_counter() - started
        outcome, message = classify(error)
        if isinstance(error, TimeoutError) and job is not None:
            job.cancel()
            if time.monotonic() >= deadline:
                outcome = "cut off by the time limit"
        return outcome, message, elapsed
    elapsed = time.perf_counter() - started
    problem = answer_problem(answer)
    if problem is None:
        return "ok", "", elapsed
    return ("truncated heatmap" if problem.startswith("heatmap") else "malformed answer"), problem, elapsed


def run_phase(phase: str, clients: list[Any], per_client: list[int], progress: Progress,
              deadline: float) -> float:
    """Every client makes its calls in its own thread, all released together; returns the wall time."""
    start = threading.Barrier(len(clients) + 1)
    progress.phase = phase

    def work(index: int) -> None:
        start.wait()
        for number in range(per_client[index]):
            if progress.abort.is_set() or time.monotonic() >= deadline:
                progress.abort.set()
                return
            image = EXAMPLES[(index + number) % len(EXAMPLES)]
            outcome, message, elapsed = one_call(clients[index], image, deadline)
            progress.add(Call(phase, index, elapsed, outcome, message))

    threads = [threading.Thread(target=work, args=(i,), name=f"{phase}-{i}", daemon=True)
               for i in range(len(clients))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + JOIN_GRACE_S)
    wall = time.perf_counter() - began
    if progress.abort.is_set() or any(thread.is_alive() for thread in threads):
        progress.abort.set()
        raise TimeLimitExceeded(f"time limit reached during {phase}")
    return wall


def spread(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def watch(pid: int, progress: Progress, samples: list[dict[str, float]], done: threading.Event,
          began: float) -> None:
    """Sample the app's memory every second; print a progress line to stderr now and then."""
    last_print = time.monotonic()
    while not done.wait(RSS_SAMPLE_S):
        rss = rss_mb(pid)
        answered = progress.answered()
        if rss is not None:
            samples.append({"t_s": round(time.monotonic() - began, 1), "requests": answered, "rss_mb": rss})
        if time.monotonic() - last_print >= PROGRESS_S:
            last_print = time.monotonic()
            phase = progress.phase
            count, failed = progress.counts(phase)
            print(f"  [{time.monotonic() - began:5.0f} s] {phase}: {count} answered, {failed} failed; "
                  f"{answered} in all; app RSS {rss or 0:.0f} MB", file=sys.stderr, flush=True)


def summarise(calls: list[Call], wall_s: float) -> dict[str, Any]:
    ok = [c.latency_s for c in calls if c.outcome == "ok"]
    queue_full = [c for c in calls if c.outcome == "queue_full"]
    failures: dict[str, int] = {}
    examples: dict[str, str] = {}
    for call in calls:
        if call.outcome not in ("ok", "queue_full"):
            failures[call.outcome] = failures.get(call.outcome, 0) + 1
            examples.setdefault(call.outcome, call.message[:500])
    latency = percentiles(ok) if ok else {"p50_ms": None, "p95_ms": None, "mean_ms": None, "n": 0}
    latency["max_ms"] = 1000.0 * max(ok) if ok else None
    return {
        "requests": len(calls),
        "succeeded": len(ok),
        "queue_full_handled": len(queue_full),
        "queue_full_messages": sorted({c.message for c in queue_full}),
        "failed": sum(failures.values()),
        "failures_by_kind": failures,
        "failure_examples": examples,
        "latency_ok": latency,
        "latency_all_ms_max": 1000.0 * max(c.latency_s for c in calls) if calls else None,
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else None,
    }


def server_timings(log_text: str) -> dict[str, Any]:
    """The app logs `scored N of M files in T ms` per request: its own time in the scoring function."""
    ms = [float(m.group(3)) for m in SERVER_TIMING.finditer(log_text)]
    cpu_ms = [float(m.group(4)) for m in SERVER_TIMING.finditer(log_text) if m.group(4)]
    lines = log_text.splitlines()
    # What each traceback ended with: its last unindented line, e.g. "RuntimeError: Response content ...".
    raised: dict[str, int] = {}
    for start, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()
                        and not lines[i].startswith(("Traceback", "During handling", "The above exception"))),
                       None)
            if end is not None:
                raised[lines[end][:200]] = raised.get(lines[end][:200], 0) + 1
    return {"requests_logged": len(ms),
            "p50_ms": float(np.percentile(ms, 50)) if ms else None,
            "p95_ms": float(np.percentile(ms, 95)) if ms else None,
            "own_cpu_ms_mean": float(np.mean(cpu_ms)) if cpu_ms else None,
            "tracebacks": sum(line.startswith("Traceback") for line in lines),
            "error_log_lines": sum(" ERROR " in line for line in lines),
            "exceptions": raised}


def load_test(args: argparse.Namespace, uri: str) -> dict[str, Any]:
    from gradio_client import Client

    began = time.monotonic()
    deadline = began + args.time_limit_min * 60.0
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TF_CPP_MIN_LOG_LEVEL": "2",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, str(APP), "--model-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    progress = Progress()
    samples: list[dict[str, float]] = []
    done = threading.Event()
    result: dict[str, Any] = {"model_uri": uri, "url": url}
    clients: list[Any] = []
    previous_tempdir = tempfile.tempdir
    with tempfile.TemporaryFile() as log, tempfile.TemporaryDirectory(prefix="load-bench-") as downloads:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own process group, stopped as one below
        watcher = threading.Thread(target=watch, args=(process.pid, progress, samples, done, began),
                                   daemon=True)
        try:
            ready_s = wait_until_ready(url, process, started)
            if ready_s is None:
                log.seek(0)
                raise RuntimeError(f"app did not answer on {url}:\n"
                                   f"{log.read().decode(errors='replace')[-2000:]}")
            result["ready_s"] = ready_s
            result["rss_ready_mb"] = rss_mb(process.pid)
            watcher.start()

            # gradio_client makes a folder in tempfile.gettempdir() for every file it downloads and
            # leaves it behind: keep those inside our temporary folder, removed at the end.
            tempfile.tempdir = downloads
            setup = time.perf_counter()
            for index in range(args.clients):
                folder = Path(downloads) / str(index)  # one folder each: no two threads write one file
                clients.append(Client(url, verbose=False, analytics_enabled=False, download_files=folder))
            result["client_setup_s"] = time.perf_counter() - setup

            phases: dict[str, dict[str, Any]] = {}

            def phase(name: str, per_client: list[int]) -> None:
                app_cpu, own_cpu = cpu_seconds(process.pid), own_cpu_seconds()
                wall = run_phase(name, clients, per_client, progress, deadline)
                phases[name] = summarise(progress.of(name), wall)
                app_after = cpu_seconds(process.pid)
                phases[name]["cpu_s"] = {"app": None if app_cpu is None or app_after is None
                                         else app_after - app_cpu, "clients": own_cpu_seconds() - own_cpu}

            phase("warm-up", spread(WARMUP_REQUESTS, args.clients))
            time.sleep(RSS_SAMPLE_S)
            rss_warm = rss_mb(process.pid)
            answered_warm, served_warm = progress.answered(), progress.served()

            phase("phase 1", [args.requests] * args.clients)
            rss_phase1 = rss_mb(process.pid)

            top_up = max(0, args.soak - (progress.answered() - answered_warm))
            if top_up:
                phase("soak top-up", spread(top_up, args.clients))
            time.sleep(RSS_SAMPLE_S)
            rss_final = rss_mb(process.pid)
            result.update({
                "phases": phases,
                "memory": {
                    "rss_after_warmup_mb": rss_warm, "requests_at_warmup": answered_warm,
                    "served_at_warmup": served_warm, "rss_after_phase1_mb": rss_phase1,
                    "rss_final_mb": rss_final, "requests_at_final": progress.answered(),
                    "served_at_final": progress.served(),
                    "growth_pct": (100.0 * (rss_final - rss_warm) / rss_warm
                                   if rss_warm and rss_final is not None else None),
                    "peak_mb": max((s["rss_mb"] for s in samples), default=None),
                },
            })
        except (TimeLimitExceeded, Stopped) as error:
            result["aborted"] = str(error)
            result["aborted_by"] = "signal" if isinstance(error, Stopped) else "time limit"
        finally:
            progress.abort.set()  # workers still running (after a signal) start no new call
            done.set()
            for client in clients:
                client.close()
            stop(process)
            tempfile.tempdir = previous_tempdir
            result["total_runtime_s"] = time.monotonic() - began
            log.seek(0)
            log_text = log.read().decode(errors="replace")
            result["server"] = server_timings(log_text)
            result["app_exit_code"] = process.returncode
            result["rss_samples"] = samples
            if progress.abort.is_set():
                names = dict.fromkeys(c.phase for c in progress.of(None))
                result["partial_phases"] = {name: summarise(progress.of(name), 0.0) for name in names}
    return result


def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def per_request_cpu_ms(app_cpu_s: float | None, requests: int) -> str:
    return "n/a" if app_cpu_s is None or not requests else f"{1000 * app_cpu_s / requests:.0f} ms"


def fmt_mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MB"


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    phase1, memory, server = result["phases"]["phase 1"], result["memory"], result["server"]
    lat = phase1["latency_ok"]
    kinds = ", ".join(f"{kind}: {count}" for kind, count in phase1["failures_by_kind"].items()) or "none"
    queue_msgs = "; ".join(f"`{m}`" for m in phase1["queue_full_messages"]) or ""
    growth = memory["growth_pct"]
    cpu = phase1["cpu_s"]
    cpu_text = (f"{'n/a' if cpu['app'] is None else format(cpu['app'], '.0f')} s / {cpu['clients']:.0f} s "
                f"({phase1['wall_s'] * (os.cpu_count() or 1):.0f} s)")
    other = [(name, p) for name, p in result["phases"].items() if name != "phase 1"]
    other_failed = sum(p["failed"] for _, p in other)
    rows = [
        row("measurement", "value", "target", "met"),
        row("---", "---", "---", "---"),
        row(f"phase 1 requests (`/predict`, {args.clients} clients x {args.requests})", str(phase1["requests"]),
            "", ""),
        row("succeeded", str(phase1["succeeded"]), "", ""),
        row("failed (timeouts, connection errors, other errors)", str(phase1["failed"]),
            f"{TARGET_FAILED}", verdict(phase1["failed"] <= TARGET_FAILED)),
        row("failures by kind", kinds, "", ""),
        row("refused with a clear \"Queue is full\" (handled, not failed)",
            f"{phase1['queue_full_handled']} {queue_msgs}".strip(), "", ""),
        row("latency per request, client wall (p50 / p95 / max)",
            f"{fmt_ms(lat['p50_ms'])} / {fmt_ms(lat['p95_ms'])} / {fmt_ms(lat['max_ms'])}", "", ""),
        row("throughput (successful requests / phase wall time)",
            f"{phase1['throughput_rps']:.1f} req/s ({phase1['wall_s']:.1f} s)", "", ""),
        row("CPU time during phase 1: app / benchmark clients (available: wall x CPUs)", cpu_text, "", ""),
        row("app CPU per request: all of it / our scoring and rendering (model thread, from its log)",
            f"{per_request_cpu_ms(cpu['app'], phase1['requests'])} / {fmt_ms(server.get('own_cpu_ms_mean'))}", "", ""),
        row("app time in the scoring function, from its log (p50 / p95)",
            f"{fmt_ms(server['p50_ms'])} / {fmt_ms(server['p95_ms'])}", "", ""),
        row(f"app RSS after warm-up ({memory['requests_at_warmup']} requests)",
            fmt_mb(memory["rss_after_warmup_mb"]), "", ""),
        row(f"app RSS after {memory['requests_at_final']} requests in all ({memory['served_at_final']} served)",
            fmt_mb(memory["rss_final_mb"]), "", ""),
        row("RSS growth (after warm-up -> end)", "n/a" if growth is None else f"{growth:+.1f}%",
            f"< {TARGET_RSS_GROWTH_PCT:.0f}%", verdict(growth is not None and growth < TARGET_RSS_GROWTH_PCT)),
        row("app RSS peak (1 s samples)", fmt_mb(memory["peak_mb"]), "", ""),
    ]
    parts = ", ".join(f"{name} {p['requests']} ({p['failed']} failed, {p['queue_full_handled']} queue full)"
                      for name, p in result["phases"].items())
    notes = (f"\nModel `{result['model_uri']}`; requests answered: {parts}; failures outside phase 1: "
             f"{other_failed}. App ready in {result['ready_s']:.1f} s, RSS {fmt_mb(result['rss_ready_mb'])} when "
             f"ready; total runtime {result['total_runtime_s']:.0f} s; {os.cpu_count()} CPUs shared by clients "
             f"and app; gradio {result['machine']['gradio']}, gradio_client {result['machine']['gradio_client']}.")
    return "\n".join(rows) + notes


def machine() -> dict[str, Any]:
    import gradio_client
    import httpx

    try:
        from importlib.metadata import version

        gradio = version("gradio")
    except Exception:  # noqa: BLE001
        gradio = "unknown"
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "gradio": gradio, "gradio_client": gradio_client.__version__, "httpx": httpx.__version__}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", default=None,
                        help=model_uri_help("exports/pneumonia-cnn if present, else the production alias"))
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (threads)")
    parser.add_argument("--requests", type=int, default=50, help="/predict calls per client in phase 1")
    parser.add_argument("--soak", type=int, default=2000,
                        help="calls answered after the warm-up (phase 1 + top-up) before the last memory reading")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file to write")
    parser.add_argument("--time-limit-min", type=float, default=15.0,
                        help="stop (exit status 3) if the whole run takes longer than this")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.soak < 1 or args.time_limit_min <= 0:
        parser.error("--clients, --requests, --soak and --time-limit-min must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Stopped from outside: unwind, so that the app's process group is still stopped.
    def on_signal(signum: int, frame: Any) -> None:
        raise Stopped(f"stopped by signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    if not EXAMPLES:
        raise SystemExit("no example images in examples/")
    uri = args.model_uri or default_model_uri()
    print(f"load benchmark: {args.clients} clients x {args.requests} /predict calls, memory over {args.soak} "
          f"calls, model {uri}, time limit {args.time_limit_min:g} min", file=sys.stderr, flush=True)
    result = load_test(args, uri)
    result["machine"] = machine()
    result["settings"] = {"clients": args.clients, "requests_per_client": args.requests, "soak": args.soak,
                          "warmup_requests": WARMUP_REQUESTS,
                          "request_timeout_s": REQUEST_TIMEOUT_S, "time_limit_min": args.time_limit_min}
    result["targets"] = {"failed": TARGET_FAILED, "rss_growth_pct": TARGET_RSS_GROWTH_PCT}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if result.get("aborted_by") == "signal":
        print(f"ABORTED: {result['aborted']} after {result['total_runtime_s']:.0f} s; the app was stopped; "
              f"what was measured is in {args.output}.", file=sys.stderr)
        return 128 + signal.SIGTERM
    if "aborted" in result:
        print(f"ABORTED: {result['aborted']} ({args.time_limit_min:g} min, {result['total_runtime_s']:.0f} s "
              f"in all); the app was stopped; what was measured is in {args.output}. Use smaller --clients, "
              "--requests or --soak, or a larger --time-limit-min.", file=sys.stderr)
        return 3
    print(markdown(result, args))
    failed = sum(p["failed"] for p in result["phases"].values())
    growth = result["memory"]["growth_pct"]
    return 0 if failed <= TARGET_FAILED and growth is not None and growth < TARGET_RSS_GROWTH_PCT else 1


if __name__ == "__main__":
    sys.exit(main())
