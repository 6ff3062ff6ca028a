"""OMA, the OSSEA Migration Appliance: one installed package.

The repository keeps `services/`, `shared/` and `plugins/` at its top (the design card's layout);
an installed copy holds them under `oma/` (setup.py maps them with `package_dir`). In a checkout,
this package also looks in the repository's top, so `oma.services` resolves there too.
This folder holds the composition roots (runner, admin, cli, gateway_worker): they import
services and plugins, which `shared/` must not.
"""
from __future__ import annotations

import os

_here = os.path.dirname(os.path.abspath(__file__))
_top = os.path.dirname(_here)
if not os.path.isdir(os.path.join(_here, "shared")) and os.path.isfile(os.path.join(_top, "pyproject.toml")):
    __path__.append(_top)  # type: ignore[name-defined]  # a checkout: services/, shared/, plugins/ beside oma/
