"""Packages for setuptools (the rest of the metadata is in pyproject.toml).

The page lives at the top of the repository, in web/, and is installed inside the package as procs/web, so
an installed server (`pip install .`, the container) serves it from site-packages; procs.config looks for
that copy first and for the checkout's web/ next.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["procs*", "ringbuf*", "protocol*"]), "procs.web"],
    package_dir={"procs.web": "web"},
)
