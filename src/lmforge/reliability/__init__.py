"""Reliability: fuzzing every reader (:mod:`lmforge.reliability.fuzz`, targets in
:mod:`lmforge.reliability.targets`); ``lmforge fuzz`` runs it. See docs/RELIABILITY.md."""

from lmforge.reliability.fuzz import Report, Target, fuzz, mutate

__all__ = ["Report", "Target", "fuzz", "mutate"]
