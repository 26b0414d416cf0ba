"""The library is the inner layer: importing any module of ``mdlda`` loads neither Ray nor ``pipelines``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import importlib, pkgutil, sys
import mdlda
names = [m.name for m in pkgutil.walk_packages(mdlda.__path__, "mdlda.", onerror=lambda name: None)]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "pipelines"))
print(len(names), " ".join(leaked))
"""


def test_importing_every_mdlda_module_loads_neither_ray_nor_pipelines():
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    ).stdout.split(maxsplit=1)
    count, leaked = int(out[0]), out[1:] and out[1].split()
    assert count > 20  # the walk found the package's modules (and subpackages), not just mdlda itself
    assert not leaked, f"mdlda imports the Ray layer at module level: {leaked[:10]}"
