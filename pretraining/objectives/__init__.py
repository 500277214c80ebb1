"""Pre-training objectives, one module each, found by name as nnU-Net finds trainers:
``nnunet_sar_pretrain --objective NAME`` imports ``nnunet_sar.pretraining.objectives.NAME`` and uses its
``OBJECTIVE`` (a subclass of ``base.Objective``). A new objective is a new module here (README,
"Adding an objective")."""
import importlib
import pkgutil

from .base import Objective

NOT_OBJECTIVES = {"base"}


def available() -> list[str]:
    """The names of all objectives (modules of this package with an ``OBJECTIVE``)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if not m.name.startswith("_") and m.name not in NOT_OBJECTIVES)


def objective_class(name: str) -> type[Objective]:
    if name not in available():
        raise KeyError(f"unknown objective {name!r}; choose from {', '.join(available())}")
    cls = getattr(importlib.import_module(f"{__name__}.{name}"), "OBJECTIVE", None)
    if cls is None or not issubclass(cls, Objective):
        raise KeyError(f"module {__name__}.{name} has no OBJECTIVE (a subclass of Objective)")
    return cls
