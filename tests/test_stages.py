"""The layout of the code: what DVC knows each stage depends on, and which way imports may go.

- every project module a stage imports (directly or through others, at any depth) is among its deps in
  dvc.yaml, so a change to it reruns the stage, and every module listed is imported;
- no stage imports another stage;
- every output dvc.yaml declares is a path named in pipeline/paths.py;
- the app and the serving package import nothing from the training package, nor TensorFlow or Keras;
- the training package imports no serving client, and the register stage depends on no client at all.
"""

from __future__ import annotations

import ast
from pathlib import Path, PurePosixPath

import pytest
import yaml

from pipeline import paths
from tests.helpers import PROJECT

PACKAGES = ("pipeline", "scoring", "serving")
STAGES = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]


def module_file(module: str) -> Path | None:
    base = PROJECT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules `path` imports anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        found |= {name for name in names if name.split(".")[0] in PACKAGES and module_file(name)}
    return found


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += imported_modules(module_file(current))
    return seen


def stage_module(stage: dict) -> str:
    command = stage["cmd"].split()
    return command[command.index("-m") + 1]


def covered(file: PurePosixPath, deps: list[str]) -> bool:
    return any(file == PurePosixPath(dep) or PurePosixPath(dep) in file.parents for dep in deps)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_project_module_is_a_dependency(name):
    stage = STAGES[name]
    files = {PurePosixPath(module_file(m).relative_to(PROJECT).as_posix()) for m in closure(stage_module(stage))}
    missing = sorted(str(file) for file in files if file.name != "__init__.py" and not covered(file, stage["deps"]))
    assert not missing, f"stage {name} imports modules dvc.yaml does not list as deps: {missing}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_listed_module_is_imported(name):
    """A module listed as a dependency but never imported reruns the stage for nothing (an edit to the predict
    CLI would register a new model version). The one file a stage uses without importing it: the pyfunc's
    code, which register logs into the model (`pipeline.register.core_modules`)."""
    from pipeline.register import PYFUNC_CODE

    stage = STAGES[name]
    imported = {module_file(m).relative_to(PROJECT).as_posix() for m in closure(stage_module(stage))}
    logged = {PYFUNC_CODE.as_posix()} if name == "register" else set()
    unused = [dep for dep in stage["deps"] if dep.endswith(".py") and dep not in imported | logged]
    assert not unused, f"stage {name} lists modules it never imports: {unused}"


def test_no_stage_imports_another_stage():
    stage_modules = {stage_module(stage) for stage in STAGES.values()}
    for module in stage_modules:
        others = imported_modules(module_file(module)) & (stage_modules - {module})
        assert not others, f"{module} imports the stage(s) {sorted(others)}"


def test_declared_outputs_are_the_paths_module_names():
    named = {str(value) for value in vars(paths).values() if isinstance(value, Path)}
    for name, stage in STAGES.items():
        for out in [*stage.get("outs", []), *stage.get("metrics", [])]:
            path = out if isinstance(out, str) else next(iter(out))
            assert path in named, f"stage {name} writes {path}, which pipeline/paths.py does not name"


def absolute_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in `path`, at module level or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module or ""))
    return found


def forbidden_imports(paths: list[Path], forbidden: set[str]) -> list[str]:
    return [f"{path.relative_to(PROJECT).as_posix()}:{line} imports {module}" for path in paths
            for line, module in absolute_imports(path) if module.split(".")[0] in forbidden]


def modules_of(package: str) -> list[Path]:
    return sorted((PROJECT / package).glob("*.py"))


def test_serving_imports_neither_training_code_nor_tensorflow():
    """app.py, serving/ and scoring/ import nothing from `pipeline`, TensorFlow, Keras or tf2onnx: the serving
    process runs an ONNX graph only."""
    paths = [PROJECT / "app.py", *modules_of("serving"), *modules_of("scoring")]
    assert not forbidden_imports(paths, {"pipeline", "tensorflow", "keras", "tf_keras", "tf2onnx"})


def test_the_pipeline_imports_no_serving_client():
    """The stages and the command-line tools (predict, batch, export) are clients of the scoring core only:
    no module of pipeline/ imports the app, the serving package or Gradio, so a change to a page never touches
    what trains, registers or exports a model (the model card, `scoring.card`, is part of the core)."""
    assert not forbidden_imports(modules_of("pipeline"), {"serving", "app", "gradio", "gradio_client", "fastapi"})


def test_the_scoring_core_imports_none_of_its_clients():
    """The core turns bytes into a decision on its own: no module of it imports the pipeline, the serving
    clients, the app, Gradio, FastAPI or TensorFlow."""
    forbidden = {"pipeline", "serving", "app", "gradio", "gradio_client", "fastapi", "tensorflow", "keras"}
    assert not forbidden_imports(modules_of("scoring"), forbidden)


CLIENT_MODULES = ("app.py", *(path.relative_to(PROJECT).as_posix() for path in modules_of("serving")))
# The command-line tools of pipeline/: the register stage scores and logs a model without any of them.
COMMAND_LINE_CLIENTS = ("pipeline/predict.py", "pipeline/batch.py", "pipeline/export.py")


def test_registration_depends_on_the_scoring_core_only():
    """A fix to the app, its Gradio workarounds, the browser page or a command-line tool must not register a
    new model version: none of them, nor anything importing Gradio, is a dependency of the register stage or
    travels in the logged model."""
    from pipeline.register import core_modules

    deps = [PROJECT / dep for dep in STAGES["register"]["deps"] if dep.endswith(".py")]
    logged = [PROJECT / module for module in core_modules(PROJECT / "scoring" / "pyfunc_model.py")]
    for path in {*deps, *logged}:
        relative = path.relative_to(PROJECT).as_posix()
        assert relative not in (*CLIENT_MODULES, *COMMAND_LINE_CLIENTS), relative
        assert not forbidden_imports([path], {"gradio", "gradio_client", "fastapi"}), relative
    assert {"scoring/runtime.py", "scoring/pyfunc.py"} <= {p.relative_to(PROJECT).as_posix() for p in logged}
    assert all(path.parent.name == "scoring" for path in logged)


def test_promotion_compares_the_scores_as_reported():
    from pipeline.register import at_least_as_good

    assert at_least_as_good(0.96849, 0.96851)  # the same model scored twice: both read 0.9685
    assert at_least_as_good(0.97, None) and at_least_as_good(0.9686, 0.9685)
    assert not at_least_as_good(0.9684, 0.9685)
