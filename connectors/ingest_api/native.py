"""The C half of OTLP ingestion (`connectors/ingest_api/_otlp_native.c`), where it was built.

It decodes protobuf requests into what ``otlp.spans_of`` yields from upb's parse (without
upb's Python objects per field: ~5x less CPU per span) and maps spans to events as
``otlp.python_span_to_event`` does (~3x less). upb and the Python mapping stay the reference
and the fallback of an install without a C compiler; tests/test_otlp_native.py runs both and
compares them.
"""

from __future__ import annotations

try:
    from connectors.ingest_api import _otlp_native as extension
except ImportError:  # pragma: no cover - an install without a C compiler
    extension = None
