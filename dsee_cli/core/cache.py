"""Where dsee-cli keeps what it computes once and reuses: $DSEE_CACHE, or ~/.cache/dsee-cli (the
Ω cache, the step store, calibration windows, GGUF files converted to model directories)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("DSEE_CACHE") or Path.home() / ".cache" / "dsee-cli")
