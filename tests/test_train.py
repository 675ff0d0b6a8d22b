"""pipeline.train: the device training runs on is the first GPU TensorFlow sees, else the CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

tf = pytest.importorskip("tensorflow")


def test_training_device_names_the_gpu_or_falls_back_to_the_cpu(monkeypatch):
    from pipeline.train import training_device

    gpu = SimpleNamespace(name="/physical_device:GPU:0")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [gpu] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda device: {"device_name": "NVIDIA H100"})
    assert training_device() == "GPU (NVIDIA H100)"
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert training_device() == "CPU"
