"""Event contracts: versioned Avro schemas (schemas/avro), the registry that serves them,
their codecs and the compatibility checker.

- ``schemas.registry``: ``LocalRegistry`` (files + ids.json), ``ConfluentRegistry``,
  ``registry_from_settings``.
- ``schemas.codec``: ``RecordCodec`` and ``EventCodec`` (decode wire/plain Avro/JSON with
  validation, encode).
- ``schemas.rules``: ``InvalidEvent``, input limits (``DecodeLimits``, ``EventRules``), strict
  JSON, text and id rules.
- ``schemas.compiler``: the Avro schema compiler (``compile_schema``, ``plain``).
- ``schemas.records``: the codecs of the pipeline's own records (billing, quota updates, alerts).
- ``schemas.avro_encoder``: generated Avro writers (in C where ``_avro_native.c`` is built), used by
  ``RecordCodec.encode`` and the producer library.
- ``schemas.dlq``: ``dlq_record``, ``encode_dlq``, ``decode_dlq``.
- ``schemas.compat``: BACKWARD/FORWARD checks behind ``gatewatch schemas check``.
- ``schemas.vocabulary``, ``schemas.pricing``: token kinds, keys, window ids, topics; prices.

Imports nothing of `ops` or `dataflows`. See schemas/README.md.
"""
