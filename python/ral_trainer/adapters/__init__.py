"""Adapters that plug RAL into RL trainers people already run.

- :mod:`ral_trainer.adapters.trl`: :class:`RALGRPOTrainer` / :class:`RALGRPOConfig`, a
  drop-in subclass of TRL's ``GRPOTrainer`` (TRL ``>=1.0,<2``).
- :mod:`ral_trainer.adapters.verl`: :class:`RALVerlAdapter`, hooks verl's actor FSDP
  engine (verl ``>=0.9,<0.10``), and ``RALActorRolloutRefWorker`` for Ray launches.

The adapters import their trainer lazily: ``import ral_trainer.adapters`` works without
TRL installed; ``from ral_trainer.adapters.trl import RALGRPOTrainer`` needs it.
"""

from __future__ import annotations

__all__ = ["RALGRPOTrainer", "RALGRPOConfig", "UnsupportedVersionError"]


class UnsupportedVersionError(ImportError):
    """The installed trainer package's version is outside the range an adapter supports."""


def check_version(package: str, version: str, low: str, high: str, what: str = ""):
    """Raise :class:`UnsupportedVersionError`, naming the range, unless
    ``low <= version < high``; returns the parsed version."""
    from packaging.version import Version

    v = Version(version)
    if not (Version(low) <= v < Version(high)):
        spec = f"{package}>={low},<{high}"
        raise UnsupportedVersionError(
            f"ral_trainer.adapters.{package} supports {spec}{what}, but {package} {version} is installed: "
            f"pip install '{spec}'")
    return v


def __getattr__(name):
    if name in ("RALGRPOTrainer", "RALGRPOConfig"):
        from . import trl as _trl
        return getattr(_trl, name)
    raise AttributeError(name)
