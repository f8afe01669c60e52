"""`optimum.graphcore.utils`: the version guard of optimum-graphcore's example scripts."""

from __future__ import annotations

from packaging import version

from .version import __version__


def check_min_version(min_version: str) -> None:
    """Raise ImportError if the optimum-graphcore API provided here is older than `min_version`."""
    if version.parse(__version__) < version.parse(min_version):
        wanted = "a source install of optimum-graphcore" if "dev" in min_version else f"optimum-graphcore >= {min_version}"
        raise ImportError(
            f"This example requires {wanted}, but the optimum.graphcore API provided by ipu_trainer is {__version__}."
        )


# The examples import the guard under this name (`check_min_version as gc_check_min_version`); code that
# imports the alias itself, which optimum-graphcore never defined, gets what it meant.
gc_check_min_version = check_min_version

__all__ = ["check_min_version", "gc_check_min_version"]
