"""The installed layout: one top-level package, ``vlm``, whose layers the import contracts in
pyproject.toml hold (checked by import-linter on the wheel's own files)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".*_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel ``pip wheel . --no-deps`` builds, from a copy of the source tree (the build
    leaves ``build/`` behind)."""
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, tmp / "src", ignore=SKIP)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(tmp / "src"), "--no-deps", "--no-build-isolation"]
        + ["--quiet", "--wheel-dir", str(tmp / "dist")],
        check=True,
        capture_output=True,
    )
    (path,) = (tmp / "dist").glob("vlm-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel's files as site-packages would hold them."""
    site = tmp_path_factory.mktemp("site")
    zipfile.ZipFile(wheel).extractall(site)
    return site


def test_the_wheel_has_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"vlm"}
    for package in ("vlm/data/", "vlm/train/", "vlm/eval/"):
        assert f"{package}__init__.py" in names
    assert "vlm/train/recipes/shapes.toml" in names  # the recipes travel as package data


def _user_project(tmp_path: Path) -> Path:
    """A project of a user's own, with a ``data`` package and ``train.py`` / ``eval.py`` modules."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("MINE = 'data'\n")
    (tmp_path / "train.py").write_text("MINE = 'train'\n")
    (tmp_path / "eval.py").write_text("MINE = 'eval'\n")
    return tmp_path


CHECK = (
    "import vlm, vlm.data, vlm.train, vlm.eval\n"
    "from vlm.eval import Predictor\n"
    "import data, train, eval\n"
    "assert (data.MINE, train.MINE, eval.MINE) == ('data', 'train', 'eval')\n"
    "print(vlm.data.__name__, Predictor.__module__)\n"
)


def test_a_users_data_train_and_eval_do_not_collide_with_vlms(tmp_path):
    """From a directory holding the user's own ``data/``, ``train.py`` and ``eval.py`` (the first
    entry of ``sys.path``), ``vlm``'s packages and the user's both import (editable install)."""
    project = _user_project(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=project, capture_output=True, text=True, env=_env()
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["vlm.data", "vlm.eval.predict"]


def test_the_installed_wheel_imports_beside_a_users_packages(installed, tmp_path):
    project = _user_project(tmp_path)
    env = _env(PYTHONPATH=str(installed))
    probe = "import vlm; print(vlm.__file__)\n" + CHECK
    out = subprocess.run([sys.executable, "-c", probe], cwd=project, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0].startswith(str(installed))  # the wheel's files, not the checkout


def _lint_imports(site: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "lint-imports"), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=_env(PYTHONPATH=str(site)),
    )


def test_the_layer_contracts_hold(installed, tmp_path):
    """import-linter checks pyproject.toml's contracts on the wheel's files, where data/, train/
    and eval/ are vlm.data, vlm.train and vlm.eval."""
    out = _lint_imports(installed, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("vlm/schema.py", "import vlm.config", "no import cycles"),  # the old config <-> registry knot
        ("vlm/model.py", "import vlm.data.decode", "the model core imports nothing above it"),
        ("vlm/eval/vqa.py", "import vlm.train.optim", "vlm.eval is not allowed to import vlm.train"),
    ],
)
def test_the_contracts_catch_a_broken_layer(installed, tmp_path, module, line, broken):
    """Each contract fails when its rule is broken: one import added to a copy of the wheel."""
    site = tmp_path / "site"
    shutil.copytree(installed, site)
    path = site / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    out = _lint_imports(site, tmp_path)
    assert out.returncode == 1
    assert broken in out.stdout


def test_the_core_contract_names_every_core_module():
    """A module added to vlm/ is held to the core's contract: the contract lists every one."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (core,) = [c for c in config["contracts"] if c["type"] == "forbidden"]
    on_disk = {
        f"vlm.{p.stem}" for p in (ROOT / "vlm").iterdir() if p.suffix == ".py" and p.stem != "__init__"
    } | {f"vlm.{p.name}" for p in (ROOT / "vlm").iterdir() if (p / "__init__.py").is_file()}
    assert set(core["source_modules"]) == on_disk - {"vlm.cli"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}
