"""The package imports from the repository root after either install (issue 23, item 1).

Python puts the current folder first on ``sys.path``, so from the root the checkout's ``oscar/``
shadows an installed copy; ``oscar.reference`` and ``oscar.kernels_numba`` live beside it
(pyproject's package-dir) and must still resolve. The non-editable case runs ``python -S``
(no site processing, so the test venv's editable-install hook is not loaded) with a
``pip install --target`` copy and the dependencies' folders on PYTHONPATH.
"""

import os
import shutil
import subprocess
import sys

import numpy
import pytest
import scipy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORT_ALL = ("import oscar, oscar.reference, oscar.kernels_numba, oscar.reference.block; "
              "print(oscar.reference.__file__)")
#: folders holding numpy and scipy (site-packages), for PYTHONPATH under ``python -S``
DEP_DIRS = sorted({os.path.dirname(os.path.dirname(m.__file__)) for m in (numpy, scipy)})


def _run(args, env_path, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(env_path)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def target_install(tmp_path_factory):
    """A non-editable ``pip install --target`` of a copy of the checkout (no network, no deps)."""
    try:
        import setuptools  # noqa: F401  (--no-build-isolation builds with the venv's setuptools)
    except ImportError:
        pytest.skip("setuptools not installed: pip --no-build-isolation cannot build oscar-kv")
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("oscar", "reference", "kernels_numba"):  # copy: pip builds in the source tree
        shutil.copytree(os.path.join(ROOT, name), src / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--no-build-isolation", "--no-index", "--target", str(site), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return str(site)


def test_non_editable_install_imports_from_repository_root(target_install):
    res = _run(["-S", "-c", IMPORT_ALL], [target_install, *DEP_DIRS])
    assert res.returncode == 0, res.stderr
    # from the root the checkout's oscar/ wins, with the checkout's own subpackages
    assert res.stdout.strip() == os.path.join(ROOT, "reference", "__init__.py")


def test_non_editable_install_runs_cli_from_repository_root(target_install):
    res = _run(["-S", "-m", "oscar", "--version"], [target_install, *DEP_DIRS])
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("oscar ")


def test_non_editable_install_imports_elsewhere(target_install, tmp_path):
    res = _run(["-S", "-c", IMPORT_ALL], [target_install, *DEP_DIRS], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == os.path.join(target_install, "oscar", "reference", "__init__.py")


def test_installed_package_ships_py_typed(target_install):
    assert os.path.isfile(os.path.join(target_install, "oscar", "py.typed"))


def test_editable_or_source_imports_from_repository_root():
    """The test environment's own install (editable in CI) from the root."""
    res = _run(["-c", IMPORT_ALL], [])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == os.path.join(ROOT, "reference", "__init__.py")


def test_plain_checkout_imports_from_repository_root():
    """No install at all (``python -S``: no site hooks), only the dependencies on the path."""
    res = _run(["-S", "-c", IMPORT_ALL], DEP_DIRS)
    assert res.returncode == 0, res.stderr


def test_torch_extra_has_the_tested_upper_bound():
    """The torch extra installs the range the test extra runs (issue 23, item 5)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    torch_spec = [r for r in extras["torch"] if r.startswith("torch")]
    test_spec = [r for r in extras["test"] if r.startswith("torch")]
    assert torch_spec == test_spec == ["torch>=2.4,<2.14"]
