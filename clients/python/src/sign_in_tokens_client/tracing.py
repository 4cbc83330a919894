"""OpenTelemetry tracing across the queue: off until a tracer is set (``use``), and then only with the API installed.

A caller's W3C trace context (``traceparent``, ``tracestate``) travels in the request's AMQP
headers, and the service continues that trace. The client needs OpenTelemetry's API only when
tracing is on (the ``otel`` extra); off, every ``span`` is the same do-nothing context manager and
nothing of OpenTelemetry is imported. Attributes name lanes, outcomes and attempts: never a
token, its URL or the key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanKind, Tracer, TracerProvider

INSTRUMENTATION: Final = "sign-in-token-service"
_tracer: Tracer | None = None
_OFF: Final[contextlib.nullcontext[None]] = contextlib.nullcontext()


class _Propagation:
    """W3C trace context in AMQP headers (whose values may arrive as bytes); made when tracing starts."""

    def __init__(self) -> None:
        from opentelemetry.propagators.textmap import Getter  # noqa: PLC0415 - only with tracing on
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator  # noqa: PLC0415

        class HeaderGetter(Getter[Mapping[str, Any]]):
            def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
                value = carrier.get(key)
                if value is None:
                    return None
                return [value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)]

            def keys(self, carrier: Mapping[str, Any]) -> list[str]:
                return list(carrier)

        self.getter = HeaderGetter()
        self.propagator = TraceContextTextMapPropagator()


_propagation: _Propagation | None = None


def use(provider: TracerProvider | None) -> None:
    """Trace with ``provider`` (None: off)."""
    global _tracer, _propagation  # noqa: PLW0603 - one tracer for the process, set at start
    _tracer = provider.get_tracer(INSTRUMENTATION) if provider is not None else None
    if _tracer is not None and _propagation is None:
        _propagation = _Propagation()


def enabled() -> bool:
    """Whether spans are made."""
    return _tracer is not None


def span(
    name: str,
    *,
    parent: Context | None = None,
    kind: SpanKind | None = None,
    attributes: Mapping[str, str | int | bool] | None = None,
) -> AbstractContextManager[Span | None]:
    """A span (the current one's child, or ``parent``'s), current inside the block; None when tracing is off.

    ``kind``: internal when not given. Off, the same do-nothing context manager every time.
    """
    if _tracer is None:
        return _OFF
    if kind is None:
        from opentelemetry.trace import SpanKind  # noqa: PLC0415 - only with tracing on

        kind = SpanKind.INTERNAL
    return _tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes)


def client_span(
    name: str, attributes: Mapping[str, str | int | bool] | None = None
) -> AbstractContextManager[Span | None]:
    """A span of kind CLIENT: a call this process makes to the service."""
    if _tracer is None:
        return _OFF
    from opentelemetry.trace import SpanKind  # noqa: PLC0415 - only with tracing on

    return span(name, kind=SpanKind.CLIENT, attributes=attributes)


def annotate(**attributes: str | int | bool | None) -> None:
    """Set attributes on the current span (those that are None are left out)."""
    if _tracer is None:
        return
    from opentelemetry.trace import get_current_span  # noqa: PLC0415 - only with tracing on

    current = get_current_span()
    for key, value in attributes.items():
        if value is not None:
            current.set_attribute(key, value)


def extract(headers: Mapping[str, Any] | None) -> Context | None:
    """The trace context a message's headers carry, or None."""
    if _propagation is None or _tracer is None or not headers or "traceparent" not in headers:
        return None
    return _propagation.propagator.extract(headers, getter=_propagation.getter)


def inject(headers: MutableMapping[str, Any]) -> None:
    """Write the current trace context (``traceparent``, ``tracestate``) into ``headers``."""
    if _propagation is not None and _tracer is not None:
        _propagation.propagator.inject(headers)
