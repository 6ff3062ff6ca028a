"""Packaging: one top-level package, `oma`, with the repository's services/, shared/ and plugins/
under it (metadata, scripts and entry points are in pyproject.toml)."""
from setuptools import find_namespace_packages, setup

TOPS = ("services", "shared", "plugins")
packages = ["oma"] + [f"oma.{top}" for top in TOPS] + [
    f"oma.{top}.{p}" for top in TOPS for p in find_namespace_packages(top, exclude=["*__pycache__*"])]
setup(packages=packages, package_dir={"oma": "oma", **{f"oma.{top}": top for top in TOPS}})
