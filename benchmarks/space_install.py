"""The Space bundle on its own: install its requirements into a fresh virtual environment, measure the size,
then run its app from there and score an example through the API.

    make space && python benchmarks/space_install.py [--space space] [--output benchmarks/space-results.json]

Needs the package index (as a Space build does). The environment holds only what `space/requirements.txt`
names, so this also shows that the app runs without TensorFlow, MLflow or DVC installed at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app_benchmark import EXAMPLES, free_port, resident_mb, stop, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
UV = ROOT / ".tools" / "bin" / "uv"
TARGET_MB = 500.0


def folder_mb(path: Path) -> float:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file() and not file.is_symlink()) / 1e6


def largest_packages(site_packages: Path, count: int = 8) -> dict[str, float]:
    sizes = {child.name: folder_mb(child) for child in site_packages.iterdir() if child.is_dir()}
    return {name: round(size, 1) for name, size in sorted(sizes.items(), key=lambda item: -item[1])[:count]}


def install(space: Path, venv: Path) -> float:
    started = time.perf_counter()
    subprocess.run([str(UV), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    subprocess.run([str(UV), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), "-r",
                    str(space / "requirements.txt")], check=True)
    return time.perf_counter() - started


def run_app(space: Path, venv: Path) -> dict:
    from gradio_client import Client, handle_file

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(GRADIO_ANALYTICS_ENABLED="False", GRADIO_SERVER_PORT=str(port))
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        process = subprocess.Popen([str(venv / "bin" / "python"), "app.py"], cwd=space, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            ready = wait_until_ready(url, process, started)
            if ready is None:
                log.seek(0)
                raise RuntimeError(log.read().decode(errors="replace")[-2000:])
            rss = resident_mb(process.pid)
            *_, details = Client(url, verbose=False).predict(handle_file(str(EXAMPLES[0])), api_name="/predict")
        finally:
            stop(process)
    return {"ready_s": round(ready, 2), "rss_ready_mb": round(rss, 1), "prediction": details}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", type=Path, default=ROOT / "space")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if not (args.space / "requirements.txt").is_file():
        raise SystemExit(f"{args.space} holds no requirements.txt: run `make space` first")
    scratch = Path(tempfile.mkdtemp(prefix="space-venv-"))
    try:
        venv = scratch / "venv"
        seconds = install(args.space, venv)
        site = next((venv / "lib").glob("python*/site-packages"))
        installed = sorted(path.name.split("-")[0].lower() for path in site.glob("*.dist-info"))
        result = {
            "installed_mb": round(folder_mb(venv), 1), "target_mb": TARGET_MB, "install_s": round(seconds, 1),
            "packages": len(installed), "largest_mb": largest_packages(site),
            "has_training_stack": sorted({"tensorflow", "keras", "mlflow", "dvc"} & set(installed)),
            "bundle_mb": round(folder_mb(args.space), 1), "app": run_app(args.space, venv),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
