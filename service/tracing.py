"""OpenTelemetry tracing across the queue: off unless the standard ``OTEL_*`` variables ask for it.

A caller's W3C trace context (``traceparent``, ``tracestate``) travels in the
request's AMQP headers; the worker continues that trace with a span for the
request and spans for its steps (decode, policy, the wait for a rate slot,
the Clerk call, the audit event, the reply), and writes the context into the
reply's and the audit event's headers. Attributes name lanes, outcomes and
attempts: never a token, its URL or the key.

``configure_from_env`` turns it on when ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER`` (``otlp``,
or ``console`` to print spans) is set; the exporter reads the rest of the
``OTEL_*`` variables itself (headers, timeouts, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``). Off, nothing is created per message: each
``span`` is a no-op context manager.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import Any, Final

from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Tracer, TracerProvider, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from service.contract.errors import ConfigError
from service.urls import MASK, is_loopback, masked_url

INSTRUMENTATION: Final = "sign-in-token-service"
_ENV_SWITCHES: Final = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER")
# The exporter's headers (often a vendor's API key), the traces' own first.
_HEADERS: Final = ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
_ENDPOINTS: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROPAGATOR: Final = TraceContextTextMapPropagator()
_tracer: Tracer | None = None


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads AMQP headers, whose values may arrive as bytes."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        return [value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_GETTER: Final = _HeaderGetter()


def use(provider: TracerProvider | None) -> None:
    """Trace with ``provider`` (None: off)."""
    global _tracer  # noqa: PLW0603 - one tracer for the process, set at start
    _tracer = provider.get_tracer(INSTRUMENTATION) if provider is not None else None


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


def enabled() -> bool:
    """Whether spans are made."""
    return _tracer is not None


_OFF: Final[contextlib.nullcontext[None]] = contextlib.nullcontext()


def span(
    name: str,
    *,
    parent: Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, str | int | bool] | None = None,
) -> AbstractContextManager[Span | None]:
    """A span (the current one's child, or ``parent``'s), current inside the block; None when tracing is off.

    Off, the same do-nothing context manager every time: nothing is made per message.
    """
    if _tracer is None:
        return _OFF
    return _tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes)


def annotate(**attributes: str | int | bool | None) -> None:
    """Set attributes on the current span (those that are None are left out)."""
    if _tracer is None:
        return
    current = get_current_span()
    for key, value in attributes.items():
        if value is not None:
            current.set_attribute(key, value)


def extract(headers: Mapping[str, Any] | None) -> Context | None:
    """The trace context a message's headers carry, or None."""
    if _tracer is None or not headers or "traceparent" not in headers:
        return None
    return _PROPAGATOR.extract(headers, getter=_GETTER)


def inject(headers: MutableMapping[str, Any]) -> None:
    """Write the current trace context (``traceparent``, ``tracestate``) into ``headers``."""
    if _tracer is not None:
        _PROPAGATOR.inject(headers)
