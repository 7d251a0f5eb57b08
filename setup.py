"""Only the package list lives here; all other metadata and options are in pyproject.toml.

recipes/ sits at the top of the repository (easy to find and fork) but ships as ``tunekit.recipes``
(``package-dir`` in pyproject.toml). Automatic discovery (``[tool.setuptools.packages.find]``) only
finds packages whose folder is named like the package, so it never found ``tunekit.recipes`` and
wheels came without recipes and configs; pyproject.toml cannot add one package to a discovered
list, this file can. Discovery stays automatic so that a new ``tunekit/<package>/`` ships without
anyone editing this list.
"""

from setuptools import find_namespace_packages, setup

# Namespace discovery so that the data-only folders under tunekit/assets/ are packages too (their
# files are package data); __pycache__ folders are not packages.
packages = find_namespace_packages(include=["tunekit", "tunekit.*"], exclude=["*.__pycache__"])
setup(packages=[*packages, "tunekit.recipes"])
