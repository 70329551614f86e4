"""Event contracts: versioned Avro schemas (schemas/avro), the registry that serves them,
their codecs and the compatibility checker.

- ``schemas.registry``: ``LocalRegistry`` (files + ids.json), ``ConfluentRegistry``,
  ``registry_from_settings``.
- ``schemas.codec``: ``EventCodec`` (decode wire/plain Avro/JSON with validation, encode),
  ``InvalidEvent``, and the codecs of the pipeline's own records (billing, quota).
- ``schemas.dlq``: ``dlq_record``, ``encode_dlq``, ``decode_dlq``.
- ``schemas.compat``: BACKWARD/FORWARD checks behind ``gatewatch schemas check``.

Imports nothing of `ops` or `dataflows`. See schemas/README.md.
"""
