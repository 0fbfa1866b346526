"""The one switch for the C accelerators: `TURBOWG_NO_C=1` (any value but empty or 0) forces every
pure-Python fallback. Read once, here, at import; every module with a C accelerator asks `use_c()`."""

from __future__ import annotations

import os

_FORCE_PYTHON = os.environ.get("TURBOWG_NO_C", "").strip() not in ("", "0")


def use_c() -> bool:
    """False when the user asked for the pure-Python data path."""
    return not _FORCE_PYTHON


def forced_python() -> bool:
    """True when TURBOWG_NO_C switched the C accelerators off (for `turbowg doctor`)."""
    return _FORCE_PYTHON
