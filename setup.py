"""Build of the native halves (everything else is in pyproject.toml): the fast redaction
tier and the OTLP protobuf decoder of the ingestion API.

optional: where no C compiler is found the install still succeeds and each falls back to
its pure-Python path (same output, more CPU: about twice for redaction, the upb decoder for
OTLP); ops/setup-test-env.sh checks that the test environment got both extensions. Where
libhs's header is found too (Debian: libhyperscan-dev), the redaction extension compiles and
scans the gate's databases itself; without it the `hyperscan` package scans them.
"""

import os
import sysconfig

from setuptools import Extension, setup


def _hyperscan_build_options() -> dict:
    """Compile and link options for libhs where its header is installed, else none."""
    prefixes = [os.environ.get("HYPERSCAN_PREFIX", ""), sysconfig.get_config_var("prefix") or "", "/usr/local", "/usr"]
    for prefix in filter(None, prefixes):
        if os.path.exists(os.path.join(prefix, "include", "hs", "hs.h")):
            options = {"define_macros": [("GATEWATCH_HYPERSCAN", "1")], "libraries": ["hs"]}
            if prefix != "/usr":  # (the compiler's own search path)
                options.update(include_dirs=[os.path.join(prefix, "include")], library_dirs=[os.path.join(prefix, "lib")])
            return options
    return {}


setup(ext_modules=[Extension("redaction._native", ["redaction/_native.c"], optional=True, **_hyperscan_build_options()),
                   Extension("connectors.ingest_api._otlp_native", ["connectors/ingest_api/_otlp_native.c"],
                             optional=True),
                   Extension("schemas._avro_native", ["schemas/_avro_native.c"], optional=True)])
