"""pipeline.params: params.yaml is the one place settings live, and a bad value fails at once, by name."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

import pytest
import yaml

from pipeline import params as params_module
from pipeline.params import (
    AugmentParams,
    DataParams,
    Params,
    ParamsError,
    SourceParams,
    TrainParams,
    load_params,
    parse_params,
    stage_params,
)
from tests.helpers import PROJECT

DELETE = object()


def project_values() -> dict[str, Any]:
    return yaml.safe_load((PROJECT / "params.yaml").read_text(encoding="utf-8"))


def variant(path: str, value: object) -> dict[str, Any]:
    """The project's params.yaml values with the dotted key `path` (a number for a list item) set to
    `value`, or removed (DELETE)."""
    values = copy.deepcopy(project_values())
    *parents, last = (int(key) if key.isdigit() else key for key in path.split("."))
    section = values
    for key in parents:
        section = section[key]
    if value is DELETE:
        del section[last]
    else:
        section[last] = value
    return values


def refused(values: dict[str, Any]) -> str:
    with pytest.raises(ParamsError) as caught:
        parse_params(values)
    return str(caught.value)


# --------------------------------------------------------------------------------------------------
# The project's own params.yaml


def test_project_params_load_and_validate_without_losing_or_adding_anything():
    params = load_params(PROJECT)
    assert isinstance(params, Params)
    assert isinstance(params.data, DataParams) and isinstance(params.train.augment, AugmentParams)
    # Every value in the file arrives as written (ints compare equal to the floats they become), and
    # nothing the file does not hold appears.
    assert dataclasses.asdict(params) == project_values()


@pytest.mark.parametrize("section", ["data", "preprocess", "train", "evaluate", "robustness", "ood", "register"])
def test_stage_params_returns_the_seed_and_the_stage_section(section):
    params = load_params(PROJECT)
    seed, chosen = stage_params(section, PROJECT)
    assert seed == params.seed == project_values()["seed"]
    assert chosen == getattr(params, section)
    assert type(chosen) is type(getattr(params, section))


def test_stage_params_finds_the_project_from_a_subfolder(monkeypatch):
    monkeypatch.chdir(PROJECT / "pipeline")  # as when a stage runs from anywhere inside the project
    seed, train = stage_params("train")
    assert (seed, train) == (load_params(PROJECT).seed, load_params(PROJECT).train)
    assert isinstance(train, TrainParams)


def test_external_set_is_a_source_with_its_checksum():
    external = {"source": "https://example.org/external.zip", "sha256": None}
    params = parse_params(variant("data.external", external))
    assert params.data.external == SourceParams(source=external["source"], sha256=None)
    assert parse_params(variant("data.external", None)).data.external is None


def test_no_augmentation_is_all_zeros():
    assert set(dataclasses.asdict(AugmentParams.none()).values()) == {0.0, "constant"}


# --------------------------------------------------------------------------------------------------
# Bad params fail on load, naming the key


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        pytest.param("colour", "blue", "colour", id="unknown-section"),
        pytest.param("train.epoch", 3, "train.epoch", id="unknown-key-typo"),
        pytest.param("train.augment.mirror", 0.5, "train.augment.mirror", id="unknown-nested-key"),
        pytest.param("data.max_members", 100, "data.max_members", id="removed-download-limit"),
        pytest.param("data.external", {"source": "x.zip", "sha256": None, "url": "y"}, "data.external.url",
                     id="unknown-external-key"),
    ],
)
def test_unknown_key_is_an_error(path, value, key):
    message = refused(variant(path, value))
    assert f"{key}: Unexpected" in message


@pytest.mark.parametrize(
    ("path", "key"),
    [
        pytest.param("seed", "seed", id="seed"),
        pytest.param("ood", "ood", id="section"),
        pytest.param("train.epochs", "train.epochs", id="key"),
        pytest.param("train.augment.erase", "train.augment.erase", id="nested-key"),
        # A key whose value may be null must still be written out: null is a choice, absence a mistake.
        pytest.param("data.external", "data.external", id="nullable-key"),
        pytest.param("data.sha256", "data.sha256", id="nullable-sha256"),
    ],
)
def test_missing_key_is_an_error_not_a_default(path, key):
    message = refused(variant(path, DELETE))
    assert f"{key}: Field required" in message


def test_missing_key_of_the_external_source_is_an_error():
    message = refused(variant("data.external", {"source": "x.zip"}))
    assert "data.external.sha256: Field required" in message


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("train.epochs", "many"),
        ("train.epochs", 2.5),
        ("train.filters", 16),
        ("train.filters.1", "wide"),
        ("train.learning_rate", "fast"),
        ("data.source", None),
        ("data.source", ["a.zip"]),
        ("data.sha256", 123),  # an unquoted all-digit digest in YAML
        ("data.external", "external.zip"),
        ("robustness.equalize", "sometimes"),
        ("robustness.downscale", 64),
        ("train", None),
        ("train.augment", [0.1]),
    ],
)
def test_wrong_type_is_an_error(path, value):
    message = refused(variant(path, value))
    assert f"{path}:" in message and repr(value) in message


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("seed", -1),
        ("preprocess.image_size", 16),
        ("preprocess.val_fraction", 0.0),
        ("preprocess.val_fraction", 1.0),
        ("preprocess.test_fraction", -0.1),
        ("preprocess.workers", 0),
        ("train.crop", 0.4),
        ("train.filters", []),
        ("train.filters.1", 0),
        ("train.learning_rate", 0.0),
        ("train.dropout", 1.0),
        ("train.augment.erase", 1.5),
        ("train.normalization", "batch"),
        ("evaluate.calibration", "isotonic"),
        ("evaluate.cross_fit_folds", 1),
        ("evaluate.target_sensitivity", 1.0),
        ("robustness.contrast.0", 0.0),
        ("ood.accept_rate", 0.5),
        ("register.promotion_metric", "f1"),
    ],
)
def test_out_of_range_value_is_an_error(path, value):
    message = refused(variant(path, value))
    assert f"{path}:" in message and repr(value) in message


def test_every_problem_is_reported_at_once():
    values = variant("train.epochs", 0)
    values["evaluate"]["calibration"] = "isotonic"
    del values["ood"]["accept_rate"]
    message = refused(values)
    for key in ("train.epochs", "evaluate.calibration", "ood.accept_rate"):
        assert f"{key}:" in message


def test_unreadable_or_invalid_params_file(tmp_path):
    with pytest.raises(ParamsError, match="cannot be read"):
        load_params(tmp_path)
    (tmp_path / "params.yaml").write_text("train: [unclosed\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path)
    (tmp_path / "params.yaml").write_text("", encoding="utf-8")
    with pytest.raises(ParamsError, match="seed: Field required"):
        load_params(tmp_path)


@pytest.mark.parametrize(("path", "value"), [("train.epochs", True), ("train.epochs", "5"),
                                             ("robustness.equalize", "yes"), ("train.augment.noise", float("inf"))])
def test_lax_coercions_are_errors(path, value):
    refused(variant(path, value))


def test_val_and_test_fractions_must_leave_training_images():
    values = variant("preprocess.val_fraction", 0.6)
    values["preprocess"]["test_fraction"] = 0.5
    assert "preprocess" in refused(values)


# --------------------------------------------------------------------------------------------------
# No second set of defaults


def params_dataclasses() -> list[type]:
    return [cls for _, cls in inspect.getmembers(params_module, inspect.isclass)
            if dataclasses.is_dataclass(cls) and cls.__module__ == params_module.__name__]


def test_every_params_field_is_required():
    classes = params_dataclasses()
    assert {cls.__name__ for cls in classes} >= {"Params", "DataParams", "SourceParams", "PreprocessParams",
                                                 "TrainParams", "AugmentParams", "EvaluateParams",
                                                 "RobustnessParams", "OodParams", "RegisterParams"}
    with_defaults = [f"{cls.__name__}.{field.name}" for cls in classes for field in dataclasses.fields(cls)
                     if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING]
    assert with_defaults == []


def test_every_section_of_params_yaml_is_a_params_field():
    assert [field.name for field in dataclasses.fields(Params)] == list(project_values())
