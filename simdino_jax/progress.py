"""How long something took or has left, as the progress lines print it (training, evaluators): ``H:MM:SS``.

One helper for every progress line, with no dependency, so any layer may import it.
"""

from __future__ import annotations

import math


def hms(seconds: float) -> str:
  """``seconds`` as H:MM:SS, truncated to whole seconds; 0:00:00 for a negative or non-finite value (an ETA before
  the first rate is known)."""
  s = int(seconds) if math.isfinite(seconds) and seconds > 0 else 0
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
