"""What a training ran on, recorded with it: the CPU, the instruction set oneDNN's kernels used, the cores.

Why it matters: on one machine the same params give the same network, whatever else runs beside it (the
kernels' work split depends on the thread count, never on the load). A CPU whose oneDNN kernels differ
(another instruction set, other cache sizes and so other blocking) sums the same products in another
order, and the float rounding grows into another network over thousands of steps (docs/experiments.md,
reproducibility). The record says which kernels a figure came from.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

# One convolution is enough for oneDNN to print the instruction set it dispatched to.
_PROBE = ("import tensorflow as tf; tf.nn.conv2d(tf.zeros([1, 8, 8, 4]), tf.zeros([3, 3, 4, 4]), 1, 'SAME')")
UNKNOWN = "unknown"


def cpu_model(cpuinfo: str | None = None) -> str:
    """'AMD EPYC (family 26, model 2)': the name the CPU gives and, as virtual machines often shorten the
    name, the family and model numbers that tell its generation."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return UNKNOWN
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", UNKNOWN)
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def kernel_isa(timeout_s: float = 60.0) -> str:
    """The instruction set oneDNN's CPU kernels use in a TensorFlow process started like this one (same
    environment, so `ONEDNN_MAX_CPU_ISA` and `TF_ENABLE_ONEDNN_OPTS` apply), as oneDNN names it."""
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
        return "oneDNN off (Eigen kernels)"
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    try:
        result = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                                timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return UNKNOWN
    return parse_isa(result.stdout + result.stderr)


def parse_isa(verbose_output: str) -> str:
    found = re.search(r"onednn_verbose,(?:v\d+,)?info,cpu,isa:([^\n]+)", verbose_output)
    return found.group(1).strip() if found else UNKNOWN


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe() -> dict[str, str]:
    """The record kept with a training (MLflow tags, reports/train_summary.json)."""
    return {"cpu": cpu_model(), "kernel_isa": kernel_isa(), "cores": str(usable_cores()),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "(not set)")}
