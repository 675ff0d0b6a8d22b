"""The lock file: both TensorFlow flavours (the `cpu` and `gpu` extras) resolve, as conflicting extras."""

from __future__ import annotations

import tomllib

from tests.helpers import PROJECT

PACKAGE = "pneumonia-screening"


def toml(name: str) -> dict:
    return tomllib.loads((PROJECT / name).read_text(encoding="utf-8"))


def locked_extras(lock: dict) -> dict[str, list[str]]:
    project = next(p for p in lock["package"] if p["name"] == PACKAGE)
    return {extra: [dep["name"] + "".join(f"[{e}]" for e in dep.get("extra", [])) for dep in deps]
            for extra, deps in project["optional-dependencies"].items()}


def test_the_lock_resolves_both_tensorflow_flavours_as_conflicting_extras():
    lock = toml("uv.lock")
    extras = locked_extras(lock)
    assert extras["cpu"] == ["tensorflow-cpu"]
    assert extras["gpu"] == ["tensorflow[and-cuda]"]
    assert {"pyspark"} <= set(extras["spark"])
    declared = [sorted(item["extra"] for item in group) for group in toml("pyproject.toml")["tool"]["uv"]["conflicts"]]
    locked = [sorted(item["extra"] for item in group if item.get("package") == PACKAGE)
              for group in lock.get("conflicts", [])]
    assert ["cpu", "gpu"] in declared and ["cpu", "gpu"] in locked, "one install would get both TensorFlows"
    names = {p["name"] for p in lock["package"]}
    assert {"tensorflow", "tensorflow-cpu", "nvidia-cudnn-cu12"} <= names, "the gpu extra did not resolve"
