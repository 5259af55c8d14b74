"""Optional libraries (extras of the ocd_hf package): imported on use, with the install command when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"setfit": "setfit", "sentence_transformers": "setfit", "timm": "timm"}


def require(module: str) -> ModuleType:
    """Import `module`, or fail with the `pip install 'ocd_hf[extra]'` that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(module, "all")
        raise ImportError(
            f"This needs {module.replace('_', '-')}, which is not installed: pip install 'ocd_hf[{extra}]' "
            f"(or pip install {module.replace('_', '-')})."
        ) from e
