"""Packaging guards: one import root (ragkv.*), every subpackage shipped, no bare imports anywhere."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"kvstore": "ragkv.kvstore", "codecs": "ragkv.codecs", "middleware": "ragkv.middleware",
           "integrations": "ragkv.integrations"}
SKIP_DIRS = {".venv", "build", "dist", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}


def project_python_files() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if not (set(p.relative_to(ROOT).parts) & SKIP_DIRS)
            and not any(part.endswith(".egg-info") for part in p.parts)]


def test_no_bare_imports_of_project_folders() -> None:
    offenders = []
    for path in project_python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} relative import")
            for name in names:
                top = name.split(".")[0]
                # 'codecs' alone is the standard library; 'codecs.<x>' for our modules is the bug.
                if top in FOLDERS and not (top == "codecs" and name == "codecs"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} import {name}")
    assert not offenders, "imports must start with ragkv.:\n" + "\n".join(offenders)


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert config["package-dir"] == {v: k for k, v in FOLDERS.items()}
    found = set()
    for folder, root_name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([root_name, *rel.parts]))
    assert found == listed, f"pyproject packages {sorted(listed)} != package folders {sorted(found)}"


def test_no_test_folder_shadows_stdlib_codecs() -> None:
    assert not list((ROOT / "tests").rglob("__init__.py")), "test folders carry no __init__.py"


@pytest.mark.parametrize("folder", sorted(set(FOLDERS) - {"codecs"}))  # bare 'codecs' is the stdlib module
def test_bare_import_from_repo_root_is_refused(folder: str) -> None:
    proc = subprocess.run([sys.executable, "-c", f"import {folder}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"ragkv.{folder}" in proc.stderr


def test_installed_package_imports_under_ragkv() -> None:
    import ragkv.codecs
    import ragkv.integrations
    import ragkv.kvstore
    import ragkv.middleware

    assert ragkv.kvstore.TieredStore.__module__ == "ragkv.kvstore.store"
    assert "raw" in ragkv.codecs.available_codecs()


def test_wheel_ships_every_module(tmp_path: Path) -> None:
    """An editable install hides a subpackage missing from ``packages``; the wheel does not."""
    build_dir = tmp_path / "src"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(build_dir)], check=True)
    # the working tree, not just HEAD: copy the package folders as they are now
    for folder in FOLDERS:  # (package data such as the bundled model comes along with its folder)
        subprocess.run(["rm", "-rf", str(build_dir / folder)], check=True)
        subprocess.run(["cp", "-r", str(ROOT / folder), str(build_dir / folder)], check=True)
    for extra in ("pyproject.toml", "README.md"):
        if (ROOT / extra).exists():
            subprocess.run(["cp", str(ROOT / extra), str(build_dir / extra)], check=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(build_dir)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("ragkv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, root_name in FOLDERS.items():
        for path in (build_dir / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(build_dir / folder)
            arc = "/".join([*root_name.split("."), *rel.parts])
            assert arc in names, f"{arc} missing from the wheel"
    assert "ragkv/__init__.py" not in names, "ragkv is a namespace with no folder of its own"
    for folder, data_dir in (("middleware", "bundled_model"), ("integrations", "sample_corpus")):
        for path in (build_dir / folder / data_dir).iterdir():
            arc = f"ragkv/{folder}/{data_dir}/{path.name}"
            assert arc in names, f"package data {arc} missing from the wheel"

