"""Where the app's memory goes on the Gradio path: resident memory and threads every `--every` calls of
`/predict`, and (`--tracemalloc`) the growth of live Python allocations between the first and the last
sample, by source line.

    python benchmarks/gradio_memory.py [--clients 8] [--warmup 200] [--calls 2000] [--every 200]
                                       [--tracemalloc] [--pythonmalloc-malloc]

Resident memory is split into anonymous, file-backed and shared pages, and the mappings that grew most
(`/proc/PID/smaps`) are listed. Starts `python app.py` (the production alias) through a small wrapper that can, on signals, write a
tracemalloc snapshot (SIGUSR1) or call glibc's `malloc_trim(0)` and print resident memory before and after
(SIGUSR2). A diagnostic, not a pass/fail benchmark: docs/benchmarks.md ("Under load") records its output.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

from app_benchmark import APP, EXAMPLES, ROOT, free_port, stop, wait_until_ready

WRAPPER = """
import ctypes, itertools, os, runpy, signal, sys, tracemalloc
if os.environ.get("TRACE"):
    tracemalloc.start(1)
snapshots = itertools.count()
def snapshot(*_):
    if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(os.path.join(os.environ["SNAPSHOTS"], f"{next(snapshots)}.snap"))
def trim(*_):
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    before = rss(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(f"malloc_trim: {before:.1f} -> {rss():.1f} MB", flush=True)
signal.signal(signal.SIGUSR1, snapshot)
signal.signal(signal.SIGUSR2, trim)
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def proc_field(pid: int, name: str) -> int:
    return int(next(line for line in open(f"/proc/{pid}/status") if line.startswith(name)).split()[1])


def sample(pid: int) -> dict[str, int]:
    """Resident memory in MB (all of it, and its anonymous, file-backed and shared parts) and threads."""
    fields = {"rss": "VmRSS", "anon": "RssAnon", "file": "RssFile", "shmem": "RssShmem"}
    return {**{key: round(proc_field(pid, name) * 1024 / 1e6) for key, name in fields.items()},
            "threads": proc_field(pid, "Threads")}


def mappings(pid: int) -> dict[str, tuple[int, int]]:
    """Per mapping of `/proc/PID/smaps`, keyed by its start address and file (anonymous ones have none, and a
    heap that grows keeps its start): (size, resident) in kB."""
    regions: dict[str, tuple[int, int]] = {}
    key = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first, *rest = line.split()
        if "-" in first and not first.endswith(":"):
            key = f"{first.split('-')[0]} {rest[4] if len(rest) > 4 else '[anonymous]'}"
        elif first in ("Size:", "Rss:"):
            size, resident = regions.get(key, (0, 0))
            regions[key] = (size + int(rest[0]), resident) if first == "Size:" else (size, resident + int(rest[0]))
    return regions


def growth(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], top: int = 12) -> list[str]:
    """The mappings whose resident memory grew most, with their size now."""
    changes = sorted(((after.get(key, (0, 0))[1] - before.get(key, (0, 0))[1], key) for key in before.keys() | after.keys()),
                     reverse=True)
    return [f"{kb / 1000:+.1f} MB resident, size {after.get(key, (0, 0))[0] / 1000:.1f} MB  at {key}"
            for kb, key in changes[:top] if kb]


def drive(clients: list, calls: int) -> None:
    from gradio_client import handle_file

    def work(client) -> None:
        for index in range(calls // len(clients)):
            client.predict(handle_file(str(EXAMPLES[index % len(EXAMPLES)])), api_name="/predict")

    threads = [threading.Thread(target=work, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--tracemalloc", action="store_true", help="also diff live Python allocations")
    parser.add_argument("--pythonmalloc-malloc", action="store_true", help="run the app with PYTHONMALLOC=malloc")
    args = parser.parse_args()
    from gradio_client import Client

    port = free_port()
    with tempfile.TemporaryDirectory() as snapshots, tempfile.TemporaryFile() as log:
        env = {**os.environ, "SNAPSHOTS": snapshots, "GRADIO_ANALYTICS_ENABLED": "False",
               "MLFLOW_DISABLE_TELEMETRY": "true", **({"TRACE": "1"} if args.tracemalloc else {}),
               **({"PYTHONMALLOC": "malloc"} if args.pythonmalloc_malloc else {})}
        process = subprocess.Popen([sys.executable, "-c", WRAPPER, str(APP), "--port", str(port)], cwd=ROOT,
                                   env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}/"
            if wait_until_ready(url, process, time.perf_counter()) is None:
                raise SystemExit("the app did not start")
            clients = [Client(url, verbose=False, analytics_enabled=False) for _ in range(args.clients)]
            drive(clients, args.warmup)
            samples = [sample(process.pid)]
            first_mappings = mappings(process.pid)
            process.send_signal(signal.SIGUSR1)
            for _ in range(args.calls // args.every):
                drive(clients, args.every)
                samples.append(sample(process.pid))
            last_mappings = mappings(process.pid)
            process.send_signal(signal.SIGUSR1)
            process.send_signal(signal.SIGUSR2)
            time.sleep(5)
        finally:
            stop(process)
            log.seek(0)
            output = log.read().decode(errors="replace")
        if process.returncode not in (0, -signal.SIGTERM, -signal.SIGINT) and "Traceback" in output:
            print(output[-3000:])
        print(f"Resident MB (all, anonymous, file, shared) and threads, after the warm-up and every {args.every} calls:")
        for key in ("rss", "anon", "file", "shmem", "threads"):
            print(f"  {key:7} {[values[key] for values in samples]}")
        print("Mappings that grew most (resident):", *growth(first_mappings, last_mappings), sep="\n  ")
        print(*[line for line in output.splitlines() if "malloc_trim" in line])
        if args.tracemalloc:
            first, last = (tracemalloc.Snapshot.load(str(Path(snapshots) / f"{i}.snap")) for i in (0, 1))
            for stat in last.compare_to(first, "lineno")[:12]:
                print(f"{stat.size_diff / 1e6:+.3f} MB {stat.count_diff:+d} blocks  {stat.traceback}")


if __name__ == "__main__":
    main()
