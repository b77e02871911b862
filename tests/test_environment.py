"""The pinned environment: pyproject.toml and environment.yml agree, and the repo uploads lean."""
import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in requirements}


def environment_pins() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in pip if not r.startswith("-e")}


def test_every_dependency_is_pinned_exactly():
    for name, spec in pyproject_pins().items():
        assert re.fullmatch(r"==[\w.]+", spec), f"{name} is not pinned exactly: {spec!r}"


def test_environment_yml_pins_the_same_versions_as_pyproject():
    assert environment_pins() == pyproject_pins()


def test_environment_yml_pins_python_311():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]


def test_working_dir_upload_leaves_out_venv_and_storage(tmp_path):
    """`ray job submit --working-dir .` must not ship the venv or the storage root."""
    import zipfile

    from ray._private.runtime_env.packaging import _zip_files

    repo = tmp_path / "repo"
    for path in ("training/train.py", ".venv/lib/big.so", "storage/datasets/x", "storage/models/m/model.pt"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text("x")
    for name in (".gitignore", ".rayignore"):
        (repo / name).write_text((ROOT / name).read_text())
    package = tmp_path / "package.zip"
    _zip_files(str(repo), [], str(package), include_gitignore=True)  # what `ray job submit` uploads
    uploaded = zipfile.ZipFile(package).namelist()
    assert "training/train.py" in uploaded
    assert not [name for name in uploaded if name.startswith((".venv", "storage"))], uploaded
