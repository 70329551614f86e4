"""The composition root: the only package that knows every other one.

It loads the settings, wires them into the lower packages and starts things; the lower
packages (`schemas`, `redaction`, `sinks`, `connectors`) never import it.

- ``cli/``: the `gatewatch` command tree (``cli/__init__.py`` lists every command).
- ``settings``, ``metrics``, ``logs``: the one settings model and loader, the Prometheus
  metrics (installing the ``sinks.metrics`` hook), JSON logs with request ids.
- ``launch``: the one flow launcher; ``migrate``: the one migration runner (topics,
  ClickHouse, audit log); ``cluster`` and ``recovery``: what a Bytewax cluster and its
  recovery store need; ``status``: the `gatewatch status` screen; ``api``: the ingestion
  API's wiring.
- ``dev/``: local servers, the demo and the load generator, no Docker needed.
- ``privacy/``: forget, export, retention, the access audit, the vault.
- ``bench/``: benchmarks. ``migrations/``, ``prometheus/``, ``grafana/``: files, not code.
"""
