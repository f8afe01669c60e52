"""The `optimum.graphcore` import path of optimum-graphcore code, served by `ipu_trainer`.

Scripts, notebooks and CI jobs written for optimum-graphcore (its last release, 0.7) import from here:

    from optimum.graphcore import IPUConfig, IPUTrainer, IPUTrainingArguments
    from optimum.graphcore.data import DataCollatorForLanguageModelingWithMaxTokensMasked

The names are `ipu_trainer`'s own objects, re-exported (nothing is copied), so they run on CPUs and GPUs.
`optimum` is a namespace package: this folder has no `optimum/__init__.py`, so it sits beside an installed
`optimum` (and its other `optimum.*` packages). If the real optimum-graphcore is installed as well, the two
provide the same import path and a warning at import names both locations.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path

import optimum  # the namespace package this one belongs to; its __path__ lists every installed portion
from transformers import TrainerState

from ipu_trainer import IncompatibleIPUConfigError, IPUConfig, IPUTrainer, IPUTrainingArguments

from .version import __version__

# optimum-graphcore's trainer state class; upstream's TrainerState serves here.
IPUTrainerState = TrainerState

__all__ = [
    "IPUConfig",
    "IPUTrainer",
    "IPUTrainerState",
    "IPUTrainingArguments",
    "IncompatibleIPUConfigError",
    "__version__",
]


def _other_installations() -> list[str]:
    """Folders of another `optimum.graphcore` package (the real optimum-graphcore) than this one."""
    here = Path(__file__).resolve().parent
    found = set()
    try:
        found.add(Path(importlib.metadata.distribution("optimum-graphcore").locate_file("optimum/graphcore")))
    except importlib.metadata.PackageNotFoundError:
        pass
    for portion in getattr(optimum, "__path__", []):
        candidate = Path(portion) / "graphcore"
        if (candidate / "__init__.py").is_file():
            found.add(candidate)
    return sorted(str(path.resolve()) for path in found if path.resolve() != here)


def _warn_if_shadowing() -> None:
    others = _other_installations()
    if others:
        warnings.warn(
            f"optimum.graphcore is imported from ipu_trainer's compatibility package at {Path(__file__).resolve().parent}, "
            f"but optimum-graphcore is also installed at {', '.join(others)}. Which one `import optimum.graphcore` "
            "finds depends on the order of sys.path; to use this project, `pip uninstall optimum-graphcore`.",
            UserWarning,
            stacklevel=3,
        )


_warn_if_shadowing()
