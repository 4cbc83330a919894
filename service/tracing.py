"""OpenTelemetry tracing across the queue: off unless the standard ``OTEL_*`` variables ask for it.

A caller's W3C trace context (``traceparent``, ``tracestate``) travels in the
request's AMQP headers; the worker continues that trace with a span for the
request and spans for its steps (decode, policy, the wait for a rate slot,
the Clerk call, the audit event, the reply), and writes the context into the
reply's and the audit event's headers. Attributes name lanes, outcomes and
attempts: never a token, its URL or the key.

The spans themselves are the client library's (``sign_in_tokens_client.tracing``, which the
service shares). ``configure_from_env`` turns it on when ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER`` (``otlp``,
or ``console`` to print spans) is set; the exporter reads the rest of the
``OTEL_*`` variables itself (headers, timeouts, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``). Off, nothing is created per message: each
``span`` is a no-op context manager.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

from sign_in_tokens_client.contract.errors import ConfigError
from sign_in_tokens_client.tracing import INSTRUMENTATION, annotate, client_span, enabled, extract, inject, span, use
from yarl import URL

from service.urls import MASK, is_loopback, masked_url

__all__ = [
    "annotate",
    "check_exporter",
    "client_span",
    "configure_from_env",
    "enabled",
    "extract",
    "inject",
    "shown_settings",
    "span",
    "use",
]

_ENV_SWITCHES: Final = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER")
# The exporter's headers (often a vendor's API key), the traces' own first.
_HEADERS: Final = ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
_ENDPOINTS: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def check_exporter(environ: Mapping[str, str]) -> None:
    """ConfigError when the exporter would send its headers (credentials) in clear off this machine."""
    endpoint = next((environ[name] for name in _ENDPOINTS if environ.get(name)), None)
    headers = next((name for name in _HEADERS if environ.get(name)), None)
    if endpoint is None or headers is None:
        return
    url = URL(endpoint)
    if url.scheme == "http" and not is_loopback(url.host or ""):
        msg = f"{headers}: an http:// endpoint off this machine would send these headers in clear; use https://"
        raise ConfigError(msg)


def shown_settings(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """The ``OTEL_*`` variables set, as ``sign-in-tokens config`` shows them: header values masked."""
    rows = []
    for name in sorted(n for n in environ if n.startswith("OTEL_")):
        value = environ[name]
        if name in _HEADERS:
            value = ",".join(f"{pair.split('=', 1)[0]}={MASK}" for pair in value.split(",") if pair.strip())
        elif "ENDPOINT" in name:
            value = masked_url(value)
        rows.append((name, value))
    return rows


def configure_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on when the ``OTEL_*`` variables ask for an exporter; whether it is on.

    ConfigError when they would send the exporter's headers in clear (``check_exporter``).
    """
    exporter_name = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter_name == "none" or not any(environ.get(name) for name in _ENV_SWITCHES):
        return False
    check_exporter(environ)
    # Imported only when used: the SDK and the exporter are not loaded by a process that does not trace.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    provider = SdkTracerProvider(resource=Resource.create({SERVICE_NAME: INSTRUMENTATION}))
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    use(provider)
    return True
