"""A gateway's request handler reporting every LLM call through EventProducer.

Standard-library WSGI so it runs anywhere; the pattern is the same in FastAPI, Flask or
aiohttp: one producer per process, created at startup; ``send()`` after the response is
computed (it never blocks, so it can also sit in a ``finally``); ``close()`` at shutdown.

    python -m connectors.examples.web_handler --bootstrap 127.0.0.1:9092 --port 8080
    curl -s localhost:8080/v1/chat/completions -H 'x-user-id: u1' -H 'x-org-id: acme' \
         -d '{"model": "gpt-4o-mini", "prompt": "hello"}'
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import signal
import sys
import time
import uuid
from wsgiref.simple_server import make_server

from connectors.producer import EventProducer
from connectors.usage import usage_tokens
from schemas.codec import InvalidEvent
from schemas.registry import registry_from_settings

log = logging.getLogger("gateway")


def call_model(model: str, prompt: str) -> dict:
    """Stand-in for the provider call: the usage block is what real APIs return."""
    time.sleep(0.02)
    return {"text": f"echo: {prompt}", "usage": {"prompt_tokens": 1200, "completion_tokens": 50,
                                                   "prompt_tokens_details": {"cached_tokens": 1024}}}


def make_app(producer: EventProducer, region: str):
    def app(environ, start_response):
        started = time.time()
        request_id = environ.get("HTTP_X_REQUEST_ID") or uuid.uuid4().hex
        body = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)) or b"{}")
        status, result, error = 200, None, None
        try:
            result = call_model(body.get("model", "gpt-4o-mini"), body.get("prompt", ""))
        except Exception:  # noqa: BLE001 - the provider failed; the event still records the call
            status, error = 502, "provider_error"
        usage = (result or {}).get("usage")
        response = json.dumps({"request_id": request_id, "text": (result or {}).get("text")}).encode()
        start_response(f"{status} {'OK' if status == 200 else 'Bad Gateway'}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(response)))])
        try:
            producer.send({
                "event_id": str(uuid.uuid4()),     # one per attempt; a retry of the same send reuses it
                "request_id": request_id,
                "event_time": int(started * 1000),
                "user_id": environ.get("HTTP_X_USER_ID", "anonymous"),
                "org_id": environ.get("HTTP_X_ORG_ID", "default"),
                "region": region,
                "provider": "openai",
                "model": body.get("model", "gpt-4o-mini"),
                "status_code": status,
                "error_code": error,
                "latency_ms": int((time.time() - started) * 1000),
                # input_tokens = UNCACHED prompt tokens; OpenAI counts cached tokens inside
                # prompt_tokens, Anthropic beside them: usage_tokens knows which is which.
                **usage_tokens(usage, "openai"),
                "prompt": body.get("prompt"),
                "response": (result or {}).get("text"),
            })
        except InvalidEvent as exc:
            # A bug in this handler, not the user's fault: log the reason (never the text).
            log.error("telemetry event rejected: %s", exc.reason)
        return [response]
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="gateway-events")
    parser.add_argument("--spool-dir", default="./gateway-spool")
    parser.add_argument("--region", default="us")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    producer = EventProducer(args.bootstrap, args.topic, registry_from_settings(None), args.spool_dir)
    atexit.register(producer.close, 10)  # deliver what is queued; the rest stays spooled
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with make_server("127.0.0.1", args.port, make_app(producer, args.region)) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
