"""The install layout and the house's import rules.

- `pip install .` adds one top-level package, `oma` (services/, shared/, plugins/ under it), so no
  other distribution's `shared` or `services` can collide with ours; the installed copy runs from
  site-packages alone.
(The floors' import rules: tests/test_layers.py.)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPS = ("services", "shared", "plugins")


def test_pip_install_adds_only_oma(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # A copy of what the Dockerfile copies: setuptools builds in the source tree (build/, egg-info).
    src = tmp_path / "src"
    for name in ("oma", *TOPS):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    # --no-deps: the layout is what is checked; build isolation fetches setuptools from the index.
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                        str(src)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = {p.name for p in site.iterdir()} - {"pip", "setuptools", "pkg_resources", "_distutils_hack",
                                               "distutils-precedence.pth", "__pycache__"}
    ours = {n for n in ours if not n.startswith(("pip-", "setuptools-"))}
    assert ours == {"oma", "oma-1.0.0.dist-info"}, sorted(ours)
    for top in TOPS:
        assert (site / "oma" / top / "__init__.py").is_file(), top
    assert list((site / "oma" / "services" / "auth" / "migrations" / "versions").glob("0001_*.py"))
    assert (site / "oma" / "services" / "gateway" / "ui" / "static" / "app.js").is_file()
    # The installed copy resolves everything from site-packages (the system's packages supply the
    # dependencies; the checkout is not on the path: cwd is elsewhere, no PYTHONPATH).
    deps = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    probe = ("import oma, oma.runner, oma.services.replication.app as a, oma.plugins.ossea.plugin;"
             "print(a.__file__); print(list(oma.__path__))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = f"{site}:{deps}"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    app_file, path = r.stdout.splitlines()
    assert app_file.startswith(str(site / "oma" / "services")), r.stdout
    assert path == str([str(site / "oma")]), r.stdout
    scripts = {p.name for p in (env_dir / "bin").iterdir()}
    assert {"oma-api", "oma-service", "oma-admin", "oma-cloudstack-sim", "oma-vma-sim"} <= scripts

