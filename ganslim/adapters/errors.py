"""The one exception the adapters raise for bad input; its message names the fix."""
from __future__ import annotations


class AdapterError(ValueError):
    """Bad input to an adapter (missing file, checkpoint not matching the flags, unsupported network)."""
