"""Build of the native halves (everything else is in pyproject.toml): the fast redaction
tier and the OTLP protobuf decoder of the ingestion API.

optional: where no C compiler is found the install still succeeds and each falls back to
its pure-Python path (same output, more CPU: about twice for redaction, the upb decoder for
OTLP); ops/setup-test-env.sh checks that the test environment got both extensions.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("redaction._native", ["redaction/_native.c"], optional=True),
                   Extension("connectors.ingest_api._otlp_native", ["connectors/ingest_api/_otlp_native.c"],
                             optional=True)])
