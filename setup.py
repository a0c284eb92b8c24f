"""Build script for pybuild (debian/rules); not meant for pip installs.

Runtime dependencies are Debian packages, listed in debian/control, so there is
no install_requires here.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup


def read_version():
    """__version__ from lclusterd/__init__.py, without importing the package."""
    text = (Path(__file__).parent / "lclusterd" / "__init__.py").read_text()
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.M)
    if match is None:
        raise RuntimeError("no __version__ in lclusterd/__init__.py")
    return match.group(1)


setup(
    name="lclusterd",
    version=read_version(),
    description="A lite clustered job scheduler for Debian",
    license="Apache-2.0",
    packages=find_packages(include=["lclusterd", "lclusterd.*"]),
    package_data={"lclusterd": ["ui/*.js", "ui/*.css"]},  # the status page's assets (ui.py)
    python_requires=">=3.11",
    entry_points={
        "console_scripts": [
            "lclusterd = lclusterd.daemon:main",
            "lclusterc = lclusterd.cli:main",
        ],
    },
)
