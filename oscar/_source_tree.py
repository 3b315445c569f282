"""Import ``oscar`` from a source checkout: map the subpackages that live beside ``oscar/``.

The installed package is ``oscar`` with the subpackages ``oscar.reference`` and
``oscar.kernels_numba`` (pyproject.toml maps them from the folders ``reference/`` and
``kernels_numba/`` with setuptools' package-dir). In a checkout those folders sit *beside*
``oscar/``, not inside it. When Python runs from the repository root, ``sys.path[0]`` (the current
folder) puts the checkout's ``oscar/`` ahead of any installed copy, and without help
``oscar.reference`` is then not found (issue 23: ``python -m oscar report`` from the root after a
non-editable ``pip install .``).

:func:`install` puts a small finder first on ``sys.meta_path`` that resolves exactly those two
names to the checkout's folders, and only when the ``oscar`` being imported is a checkout's (no
``reference/`` inside it, ``../reference/__init__.py`` beside it). An installed ``oscar`` (wheel or
``--target``) has the subpackages inside and never installs the finder. The finder goes first so
that the checkout's own subpackages win over those of an editable install of another checkout.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

#: subpackage of ``oscar`` -> its folder, relative to the repository root (pyproject.toml)
SUBPACKAGES = {"reference": "reference", "kernels_numba": "kernels_numba"}


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``oscar.<sub>`` in ``<root>/<folder>`` for the subpackages of a checkout."""

    def __init__(self, root: str):
        self.root = root
        self.folders = {f"oscar.{name}": os.path.join(root, folder)
                        for name, folder in SUBPACKAGES.items()}

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        parent = sys.modules.get("oscar")
        # Only for the checkout this finder was made for (another oscar may be imported later).
        if parent is None or os.path.dirname(os.path.dirname(
                os.path.abspath(getattr(parent, "__file__", "") or ""))) != self.root:
            return None
        init = os.path.join(folder, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[folder])


def install(package_file: str) -> bool:
    """Install the finder if ``package_file`` (``oscar/__init__.py``) is in a checkout.

    Returns True when the finder is (already) installed for this checkout.
    """
    here = os.path.dirname(os.path.abspath(package_file))
    root = os.path.dirname(here)
    if os.path.isdir(os.path.join(here, "reference")):
        return False  # an installed package: the subpackages are inside it
    if not all(os.path.isfile(os.path.join(root, folder, "__init__.py"))
               for folder in SUBPACKAGES.values()):
        return False
    for finder in sys.meta_path:
        if type(finder).__name__ == "_SourceTreeFinder" and getattr(finder, "root", None) == root:
            return True
    sys.meta_path.insert(0, _SourceTreeFinder(root))
    return True
