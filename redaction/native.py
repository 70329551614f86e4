"""The C half of the fast tier (`redaction/_native.c`), where it was built.

It does what parts of the Python code do, faster, with the same results: the gate's match
callback and the window loop (`engine.Redactor._hit_sink` / `_detect_windows`), the gate's
scan itself where it was built against libhs (`gate_scanner`), and the candidate scans and
validators listed in redaction/README.md. The Python code is the reference and the fallback of an
install without a C compiler; the tests run both and compare them.
"""

from __future__ import annotations

from types import ModuleType

try:
    from redaction import _native as extension
except ImportError:  # pragma: no cover - an install without a C compiler
    extension = None


def chosen(wanted: bool | None) -> ModuleType | None:
    """The extension module if it is to be used: wanted True requires it, False refuses it,
    None takes it where it was built."""
    if wanted is False:
        return None
    if extension is None and wanted:
        raise RuntimeError("the native redaction extension (redaction/_native.c) is not built: pip install -e . "
                           "with a C compiler, or Redactor(native=None) for the Python path")
    return extension


def gate_scanner(extension: ModuleType | None) -> ModuleType | None:
    """The extension if it compiles and scans the gate's databases itself (built against
    libhs, on a CPU libhs runs on), else None: the hyperscan package scans them."""
    if extension is None or getattr(extension, "HYPERSCAN_VERSION", None) is None:
        return None
    return extension
