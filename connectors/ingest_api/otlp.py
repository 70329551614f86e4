"""OpenTelemetry GenAI spans -> gateway events (pure functions, no I/O).

Input is an OTLP ``ExportTraceServiceRequest`` (protobuf bytes, or OTLP/JSON already
parsed with ``request_from_json``). Each span becomes a ``Span`` (plain Python values), and
``span_to_event`` maps one GenAI span to a gateway event dict that ``EventProducer.send``
accepts, or raises ``SpanRejected`` naming the attribute and the rule. Spans that are not
GenAI calls (HTTP handlers, DB queries, ...) map to ``None``: the caller counts and drops them.

Token semantics, the trap this module exists for. Our schema's ``input_tokens`` are the
UNCACHED prompt tokens; cache reads and cache writes are separate, never inside it.
OpenTelemetry's ``gen_ai.usage.input_tokens`` (like OpenAI's ``prompt_tokens`` and
OpenInference's ``llm.token_count.prompt``) INCLUDES ``cache_read`` and ``cache_creation``,
so they are subtracted exactly once. Output tokens include reasoning tokens in every
convention and in ours, so ``reasoning.output_tokens`` is never added: it becomes the
event's ``reasoning_tokens``, the part of output shown apart (an output count smaller than
its reasoning part cannot include it, and is taken as exclusive, like a prompt count
smaller than its cache). One naming convention is read per span (the first one present,
newest first), never a sum of two. The span's trace and span ids become the event's
``trace_id``/``span_id``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from connectors.ingest_api import native

STATUS_ERROR = Status.STATUS_CODE_ERROR
NS_PER_MS = 1_000_000

# Token attribute names per convention, newest first: (input incl. cache, output incl.
# reasoning, cache read, cache write, reasoning names (part of output)).
TOKEN_CONVENTIONS = (
    ("semconv", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
     "gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_creation.input_tokens",
     # the second spelling is Sentry's, the third OpenLLMetry's, both beside semconv names
     ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.output_tokens.reasoning",
      "gen_ai.usage.reasoning_tokens")),
    ("legacy", "gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens",
     "gen_ai.usage.cache_read_input_tokens", "gen_ai.usage.cache_creation_input_tokens",
     ("gen_ai.usage.reasoning_tokens", "gen_ai.usage.completion_tokens_details.reasoning_tokens")),
    ("openinference", "llm.token_count.prompt", "llm.token_count.completion",
     "llm.token_count.prompt_details.cache_read", "llm.token_count.prompt_details.cache_write",
     ("llm.token_count.completion_details.reasoning",)),
)
# The requested name is the price table's key ("gpt-4o-mini"); the response's dated
# snapshot ("gpt-4o-mini-2024-07-18") is the schema's model_version.
MODEL_ATTRIBUTES = ("gen_ai.request.model", "gen_ai.response.model", "llm.model_name")
RESPONSE_MODEL_ATTRIBUTES = ("gen_ai.response.model", "llm.model_name")
PROVIDER_ATTRIBUTES = ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system")
USER_ATTRIBUTES = ("user.id", "enduser.id", "gen_ai.user.id")
REQUEST_ID_ATTRIBUTES = ("gatewatch.request_id", "http.request.header.x-request-id", "gen_ai.response.id")
CONVERSATION_ATTRIBUTES = ("gen_ai.conversation.id", "session.id")
REQUEST_MODEL, OPERATION, ERROR_TYPE = "gen_ai.request.model", "gen_ai.operation.name", "error.type"
HTTP_STATUS, STREAM = "http.response.status_code", "gen_ai.request.stream"
INPUT_MESSAGES, OUTPUT_MESSAGES = "gen_ai.input.messages", "gen_ai.output.messages"
GENAI_MARKERS = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.system")
OPENINFERENCE_LLM_KINDS = ("LLM", "EMBEDDING")
# OpenTelemetry's provider names -> the provider names our price table and dashboards use.
PROVIDERS = {"aws.bedrock": "bedrock", "gcp.gemini": "google", "gcp.vertex_ai": "google", "gcp.gen_ai": "google",
             "vertex_ai": "google", "gemini": "google", "azure.ai.openai": "azure", "azure.ai.inference": "azure",
             "az.ai.openai": "azure", "az.ai.inference": "azure"}
ENDPOINTS = {"chat": "chat.completions", "text_completion": "completions", "embeddings": "embeddings",
             "generate_content": "generate_content", "create_agent": "agents", "invoke_agent": "agents",
             "execute_tool": "tools"}
DEFAULT_USER = "anonymous"
_NO_DEFAULTS: dict = {}
_SAFE_CODE = re.compile(r"[^A-Za-z0-9_.:\-]")


class SpanRejected(ValueError):
    """A GenAI span that cannot become an event: ``field`` (the attribute) and ``rule``."""

    def __init__(self, field_name: str, rule: str):
        super().__init__(f"{field_name}: {rule}")
        self.field = field_name
        self.rule = rule


@dataclass
class Span:
    trace_id: str
    """32 lowercase hex digits."""
    span_id: str
    """16 lowercase hex digits."""
    name: str
    start_ns: int
    end_ns: int
    status_error: bool
    attributes: dict[str, Any]
    resource: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def get(self, *names: str) -> Any:
        """The first of ``names`` set on the span, else on its resource, else None."""
        attributes = self.attributes  # called ~15 times per span: no tuple of sources, no nested loop
        for name in names:
            value = attributes.get(name)
            if value is not None and value != "":
                return value
        if self.resource:
            for name in names:
                value = self.resource.get(name)
                if value is not None and value != "":
                    return value
        return None


# -- OTLP -> Span -------------------------------------------------------------------------

def any_value(value) -> Any:
    """An OTLP AnyValue as a plain Python value."""
    kind = value.WhichOneof("value")
    if kind == "string_value":  # most attributes; the getattr below costs more
        return value.string_value
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def attributes(key_values) -> dict[str, Any]:
    out = {}
    for kv in key_values:
        value = kv.value
        # Most GenAI attributes are strings: a non-empty string_value can only be the
        # oneof's value, so WhichOneof (a call into upb per attribute) is asked only
        # for the others.
        text = value.string_value
        if text:
            out[kv.key] = text
            continue
        kind = value.WhichOneof("value")
        if kind == "int_value":
            out[kv.key] = value.int_value
        elif kind == "string_value":
            out[kv.key] = text
        else:
            out[kv.key] = any_value(value)
    return out


def spans_of(request: ExportTraceServiceRequest):
    """Every span of an export request, as ``Span``, in order."""
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield Span(trace_id=span.trace_id.hex(), span_id=span.span_id.hex(), name=span.name,
                           start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                           status_error=span.status.code == STATUS_ERROR, attributes=attributes(span.attributes),
                           resource=resource,
                           events=[(event.name, attributes(event.attributes)) for event in span.events])


def request_from_protobuf(body: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    return request


def spans_from_protobuf(body: bytes, use_native: bool = True) -> list[Span]:
    """Every span of a protobuf ``ExportTraceServiceRequest``, as ``spans_of`` yields them;
    raises ``DecodeError`` for bytes upb would refuse. The C decoder where it was built
    (``native``), else upb."""
    if use_native and native.extension is not None:
        try:
            return native.extension.decode_spans(body, Span)
        except native.extension.DecodeError as exc:
            raise DecodeError(f"Error parsing message with type "
                              f"'{ExportTraceServiceRequest.DESCRIPTOR.full_name}': {exc}") from None
    return list(spans_of(request_from_protobuf(body)))


_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})


def _ids_to_base64(node: Any) -> Any:
    """OTLP/JSON writes trace and span ids as hex; protobuf's JSON mapping expects base64."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in _ID_KEYS and isinstance(value, str):
                try:
                    value = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError:
                    raise SpanRejected(key, "must be a hex string") from None
            else:
                value = _ids_to_base64(value)
            out[key] = value
        return out
    if isinstance(node, list):
        return [_ids_to_base64(item) for item in node]
    return node


def request_from_json(document: Any) -> ExportTraceServiceRequest:
    """An OTLP/JSON export request (already parsed from JSON) as the protobuf message."""
    from google.protobuf import json_format

    if not isinstance(document, dict):
        raise SpanRejected("body", "must be an OTLP/JSON ExportTraceServiceRequest object")
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(_ids_to_base64(document), request, ignore_unknown_fields=True)
    except (json_format.ParseError, binascii.Error) as exc:
        raise SpanRejected("body", f"not an OTLP/JSON ExportTraceServiceRequest ({str(exc)[:200]})") from None
    return request


# -- Span -> event --------------------------------------------------------------------------

def is_genai(span: Span) -> bool:
    attributes = span.attributes
    for name in GENAI_MARKERS:  # not any(generator): this runs for every span, a generator costs 4x
        if name in attributes:
            return True
    return attributes.get("openinference.span.kind") in OPENINFERENCE_LLM_KINDS


def _count(get: Callable[..., Any], name: str) -> int:
    value = get(name)
    if value is None:
        return 0
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value):
        raise SpanRejected(name, "must be a number")
    if value < 0:
        raise SpanRejected(name, "must not be negative")
    return int(value)


def _first_count(get: Callable[..., Any], names: tuple[str, ...]) -> int:
    if get(*names) is None:  # the common case, in one call
        return 0
    for name in names:
        if get(name) is not None:
            return _count(get, name)
    return 0


def _token_counts(get: Callable[..., Any]) -> tuple[int, int, int, int, int]:
    """(uncached input, output, cache read, cache write, reasoning part of output)."""
    for _convention, total_in, out, cache_read, cache_write, reasoning_names in TOKEN_CONVENTIONS:
        if get(total_in, out, cache_read, cache_write) is None:
            continue
        prompt, read, write = _count(get, total_in), _count(get, cache_read), _count(get, cache_write)
        if prompt < read + write:
            # A prompt count smaller than its own cached part cannot include it: this
            # instrumentation reports Anthropic-style exclusive input, keep it as is.
            uncached = prompt
        else:
            uncached = prompt - read - write
        output, reasoning = _count(get, out), _first_count(get, reasoning_names)
        if output < reasoning:
            # Same reading for output: a count smaller than its reasoning part excludes it.
            output += reasoning
        return uncached, output, read, write, reasoning
    return 0, 0, 0, 0, 0


def token_counts(span: Span) -> dict[str, int]:
    """The span's usage as our four exclusive token kinds, each counted exactly once, and
    the reasoning part of the output."""
    uncached, output, read, write, reasoning = _token_counts(span.get)
    return {"input_tokens": uncached, "output_tokens": output, "cache_read_tokens": read, "cache_write_tokens": write,
            "reasoning_tokens": reasoning}


def _text_of_parts(parts: Any) -> list[str]:
    texts = []
    for part in parts if isinstance(parts, list) else [parts]:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            content = part.get("content")  # the semconv shape: first of the keys below, asked first
            if isinstance(content, str):
                texts.append(content)
                continue
            for key in ("text", "result", "response"):
                if isinstance(part.get(key), str):
                    texts.append(part[key])
                    break
            else:
                if "parts" in part:
                    texts.extend(_text_of_parts(part["parts"]))
                elif isinstance(part.get("message"), dict):
                    texts.extend(_text_of_parts(part["message"]))
    return texts


_MESSAGE_BODY_KEYS = ("parts", "content", "message")


def python_messages_text(value: Any) -> str | None:
    """GenAI messages (a JSON string or structured list, semconv or legacy shape) as
    ``role: text`` lines; a plain string stays as it is. ``messages_text`` is this, or the
    native decoder's equal (its reference) where it was built."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.startswith(("[", "{")):
            return value
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    lines = []
    for message in value if isinstance(value, list) else [value]:
        if isinstance(message, dict):
            for body_key in _MESSAGE_BODY_KEYS:
                if body_key in message:
                    body = message[body_key]
                    break
            else:
                body = message
            text = "\n".join(_text_of_parts(body))
            role = message.get("role")
            if not role and isinstance(message.get("message"), dict):
                role = message["message"].get("role")
            lines.append(f"{role}: {text}" if role else text)
        elif isinstance(message, str):
            lines.append(message)
    return "\n".join(lines) if lines else None


def _indexed_messages(span: Span, prefix: str) -> str | None:
    """OpenInference's flattened messages: ``llm.input_messages.0.message.content`` ..."""
    lines = []
    index = 0
    while (content := span.attributes.get(f"{prefix}.{index}.message.content")) is not None:
        role = span.attributes.get(f"{prefix}.{index}.message.role")
        lines.append(f"{role}: {content}" if role else str(content))
        index += 1
    return "\n".join(lines) if lines else None


def _from_events(span: Span, attribute: str, legacy_events: tuple[str, ...]) -> str | None:
    for _name, attrs in span.events:
        if attrs.get(attribute) is not None:
            return messages_text(attrs[attribute])
    lines = []
    for name, attrs in span.events:
        if name in legacy_events:
            text = messages_text(attrs.get("content") or attrs.get("message") or attrs.get("body"))
            if text:
                role = name.split(".")[1] if name.endswith(".message") else None
                lines.append(f"{role}: {text}" if role else text)
    return "\n".join(lines) if lines else None


def prompt_and_response(span: Span) -> tuple[str | None, str | None]:
    prompt = (messages_text(span.attributes.get(INPUT_MESSAGES))
              or _from_events(span, INPUT_MESSAGES, ("gen_ai.system.message", "gen_ai.user.message",
                                                     "gen_ai.assistant.message", "gen_ai.tool.message"))
              or messages_text(span.attributes.get("gen_ai.prompt"))
              or _indexed_messages(span, "llm.input_messages")
              or messages_text(span.attributes.get("input.value")))
    response = (messages_text(span.attributes.get(OUTPUT_MESSAGES))
                or _from_events(span, OUTPUT_MESSAGES, ("gen_ai.choice",))
                or messages_text(span.attributes.get("gen_ai.completion"))
                or _indexed_messages(span, "llm.output_messages")
                or messages_text(span.attributes.get("output.value")))
    return prompt, response


def event_id(span: Span) -> str:
    """Deterministic per span: an exporter's retry of the same span is a duplicate."""
    return f"otel-{span.trace_id}-{span.span_id}"


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _invocation_model(span: Span) -> str | None:
    """OpenInference puts the requested model in the JSON of llm.invocation_parameters."""
    parameters = span.attributes.get("llm.invocation_parameters")
    if not isinstance(parameters, str) or '"model"' not in parameters:
        return None
    try:
        model = orjson.loads(parameters).get("model")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return model if isinstance(model, str) and model else None


def span_to_event(span: Span, org_id: str, region: str, defaults: dict | None = None) -> dict | None:
    """One GenAI span as a gateway event for ``org_id``/``region``; None for a span that
    is not a GenAI call. Raises SpanRejected for a GenAI span that cannot be one.

    ``defaults`` (the event schema's field defaults) fill the fields the mapping does not
    set: the same values validation would fill, but an event with every field takes the
    codec's one-pass path (1.8 us less per event than one with fields missing).

    The C mapping (``map_span`` of the native decoder, ~1/4 of the CPU) where it was built,
    ``python_span_to_event`` (the reference) elsewhere and for spans of unusual types."""
    if _map_span is not None:
        event = _map_span(span, org_id, region, defaults)
        if event is not NotImplemented:
            return event
    return python_span_to_event(span, org_id, region, defaults)


def python_span_to_event(span: Span, org_id: str, region: str, defaults: dict | None = None) -> dict | None:
    """``span_to_event`` in Python: the reference of ``map_span`` (connectors/ingest_api/_otlp_native.c)."""
    if not is_genai(span):
        return None
    trace_id, span_id = span.trace_id, span.span_id
    if len(trace_id) != 32 or len(span_id) != 16 or not int(trace_id, 16) or not int(span_id, 16):
        raise SpanRejected("trace_id/span_id", "must be a non-zero 16-byte trace id and 8-byte span id")
    get = span.get
    model = _text(get(REQUEST_MODEL)) or _invocation_model(span) or _text(get(*MODEL_ATTRIBUTES))
    if not model:
        raise SpanRejected("gen_ai.request.model", "required (or gen_ai.response.model)")
    start_ns, end_ns = span.start_ns, span.end_ns
    if start_ns <= 0:
        raise SpanRejected("start_time_unix_nano", "must be set")
    if end_ns < start_ns:
        raise SpanRejected("end_time_unix_nano", "must not be before start_time_unix_nano")
    provider = (_text(get(*PROVIDER_ATTRIBUTES)) or "unknown").lower()
    operation = _text(get(OPERATION))
    error_type = _text(get(ERROR_TYPE))
    http_status = get(HTTP_STATUS)
    failed = span.status_error or error_type is not None
    status_code = int(http_status) if isinstance(http_status, int) and 100 <= http_status <= 599 else (
        500 if failed else 200)
    response_model = _text(get(*RESPONSE_MODEL_ATTRIBUTES))
    prompt, response = prompt_and_response(span)
    stream = get(STREAM)
    uncached, output, read, write, reasoning = _token_counts(get)
    return {
        **(defaults or _NO_DEFAULTS),
        "event_id": event_id(span),
        "request_id": _text(get(*REQUEST_ID_ATTRIBUTES)) or f"{trace_id}-{span_id}",
        "event_time": start_ns // NS_PER_MS,
        "user_id": _text(get(*USER_ATTRIBUTES)) or DEFAULT_USER,
        "org_id": org_id,
        "region": region,
        "provider": PROVIDERS.get(provider, provider),
        "endpoint": ENDPOINTS.get(operation, operation or "chat.completions"),
        "model": model,
        "model_version": response_model if response_model and response_model != model else None,
        "status_code": status_code,
        "error_code": _error_code(error_type) if failed and error_type else ("error" if failed else None),
        "streaming": stream if isinstance(stream, bool) else False,
        "latency_ms": (end_ns - start_ns) // NS_PER_MS,
        "input_tokens": uncached,
        "output_tokens": output,
        "cache_read_tokens": read,
        "cache_write_tokens": write,
        "reasoning_tokens": reasoning,
        "prompt": prompt,
        "response": response,
        "conversation_id": _text(get(*CONVERSATION_ATTRIBUTES)),
        "trace_id": trace_id,
        "span_id": span_id,
    }


def _error_code(error_type: str) -> str:
    return _SAFE_CODE.sub("_", error_type)[:64] or "error"


def _native_mapping():
    if native.extension is None:
        return None
    native.extension.configure({
        "genai_markers": GENAI_MARKERS, "openinference_kind": "openinference.span.kind",
        "openinference_llm_kinds": OPENINFERENCE_LLM_KINDS, "request_model": (REQUEST_MODEL,),
        "model_attributes": MODEL_ATTRIBUTES, "response_model_attributes": RESPONSE_MODEL_ATTRIBUTES,
        "provider_attributes": PROVIDER_ATTRIBUTES, "providers": PROVIDERS, "endpoints": ENDPOINTS,
        "operation": (OPERATION,), "error_type": (ERROR_TYPE,), "http_status": (HTTP_STATUS,), "stream": (STREAM,),
        "request_id_attributes": REQUEST_ID_ATTRIBUTES, "user_attributes": USER_ATTRIBUTES,
        "conversation_attributes": CONVERSATION_ATTRIBUTES, "token_conventions": TOKEN_CONVENTIONS,
        "span_rejected": SpanRejected, "prompt_and_response": prompt_and_response,
        "invocation_model": _invocation_model, "error_code": _error_code, "default_user": DEFAULT_USER,
        "unknown_provider": "unknown", "default_endpoint": "chat.completions", "plain_error": "error",
        "ns_per_ms": NS_PER_MS, "json_loads": orjson.loads, "json_decode_error": orjson.JSONDecodeError,
        "input_messages": INPUT_MESSAGES, "output_messages": OUTPUT_MESSAGES})
    return native.extension.map_span


_map_span = _native_mapping()
messages_text = python_messages_text if _map_span is None else native.extension.messages_text
