"""What a training records of the machine it ran on (pipeline.hardware)."""

from __future__ import annotations

import platform

import pytest

from pipeline import hardware

VERBOSE = """onednn_verbose,v1,info,oneDNN v3.7.3 (commit N/A)
onednn_verbose,v1,info,cpu,runtime:threadpool,nthr:2
onednn_verbose,v1,info,cpu,isa:Intel AVX2 with Intel DL Boost
onednn_verbose,v1,info,gpu,runtime:none
"""


def test_the_cpu_is_named_with_its_family_and_model():
    cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
    assert hardware.cpu_model(cpuinfo) == "AMD EPYC (family 26, model 2)"
    assert hardware.cpu_model("model name\t: Some CPU\n") == "Some CPU"


def test_the_kernels_instruction_set_is_read_from_onednn():
    assert hardware.parse_isa(VERBOSE) == "Intel AVX2 with Intel DL Boost"
    assert hardware.parse_isa("no such line") == hardware.UNKNOWN


@pytest.mark.skipif(platform.machine() != "x86_64", reason="oneDNN's x86 kernels")
def test_a_capped_instruction_set_is_what_the_record_says(monkeypatch):
    """ONEDNN_MAX_CPU_ISA (one way to make CPUs of different generations use the same kernels) is seen by the
    probe, which runs in this process's environment."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    record = hardware.describe()
    assert record["kernel_isa"].startswith("Intel AVX2") and record["onednn_max_cpu_isa"] == "AVX2"
    assert int(record["cores"]) >= 1
