"""Provider usage blocks as gatewatch's token counts: what a gateway puts in an event's
``input_tokens``, ``output_tokens``, ``cache_read_tokens``, ``cache_write_tokens`` and
``reasoning_tokens`` (see schemas/README.md for why the providers' counts differ).
"""

from __future__ import annotations


def _int(value) -> int:
    return int(value or 0)


def usage_tokens(usage: dict | None, provider: str = "openai") -> dict[str, int]:
    """A provider's usage block as gatewatch's four token counts, with input_tokens the
    UNCACHED prompt tokens (cache reads and writes apart, never inside input_tokens), and
    ``reasoning_tokens``, the part of output_tokens spent reasoning (never added to them).

    Providers disagree: OpenAI and Gemini include cached tokens in their prompt count
    (subtract them); Anthropic and Bedrock report them beside it. Gemini counts thoughts
    beside its candidates (added to output); OpenAI inside completion tokens; Anthropic and
    Bedrock bill thinking as output without a separate count (reasoning 0). Unknown
    providers are read as OpenAI-style."""
    usage = usage or {}
    provider = provider.lower()
    if provider == "anthropic":
        return {"input_tokens": _int(usage.get("input_tokens")),
                "output_tokens": _int(usage.get("output_tokens")),
                "cache_read_tokens": _int(usage.get("cache_read_input_tokens")),
                "cache_write_tokens": _int(usage.get("cache_creation_input_tokens")), "reasoning_tokens": 0}
    if provider == "bedrock":
        return {"input_tokens": _int(usage.get("inputTokens")),
                "output_tokens": _int(usage.get("outputTokens")),
                "cache_read_tokens": _int(usage.get("cacheReadInputTokens")),
                "cache_write_tokens": _int(usage.get("cacheWriteInputTokens")), "reasoning_tokens": 0}
    if provider in ("google", "gemini", "vertex"):
        cached = _int(usage.get("cachedContentTokenCount"))
        thoughts = _int(usage.get("thoughtsTokenCount"))
        return {"input_tokens": max(0, _int(usage.get("promptTokenCount")) - cached),
                "output_tokens": _int(usage.get("candidatesTokenCount")) + thoughts,
                "cache_read_tokens": cached, "cache_write_tokens": 0, "reasoning_tokens": thoughts}
    # OpenAI chat completions (prompt_/completion_tokens) or responses API (input_/output_tokens).
    prompt = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    cached = _int(details.get("cached_tokens"))
    output_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    return {"input_tokens": max(0, prompt - cached),
            "output_tokens": _int(usage.get("completion_tokens", usage.get("output_tokens"))),
            "cache_read_tokens": cached, "cache_write_tokens": 0,
            "reasoning_tokens": _int(output_details.get("reasoning_tokens"))}
