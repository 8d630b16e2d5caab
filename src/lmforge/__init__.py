"""lmforge: make, understand and run a language model end to end."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.api import load

__all__ = ["load"]


def __getattr__(name: str) -> Any:
    # `import lmforge` stays light (no torch import); `lmforge.load` imports the API on first use.
    if name == "load":
        from lmforge.api import load

        return load
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
