"""Packages: each top-level folder installs under one namespace, `nmt` (nmt.engine, nmt.server,
...), so nothing named `server` or `training` lands in a user's site-packages. The folders stay
where they are; this maps them. Only folders present are packaged: the server image copies engine/
and server/ alone and gets neither torch code nor the exporter. Everything else is pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

FOLDERS = ("engine", "server", "export", "training", "bench")
present = [folder for folder in FOLDERS if (Path(__file__).parent / folder / "__init__.py").is_file()]
setup(
    packages=[
        f"nmt.{folder}{'.' + sub if sub else ''}" for folder in present for sub in ["", *find_packages(where=folder)]
    ],
    package_dir={f"nmt.{folder}": folder for folder in present},
    package_data={"nmt.training": ["py.typed"]} if "training" in present else {},
)
