"""kfacperf: profile, simulate and report distributed K-FAC / SP-NGD training."""
from __future__ import annotations

__version__ = "0.1.0"
