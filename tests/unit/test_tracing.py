"""Tracing is off unless the OTEL_* variables ask for an exporter; the trace context rides in headers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from sign_in_tokens_client.contract.errors import ConfigError

from service import tracing


@pytest.fixture(autouse=True)
def off_after() -> Iterator[None]:
    yield
    tracing.use(None)


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),  # naming the service asks for no exporter
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ],
)
def test_the_standard_variables_turn_it_on(environ: dict[str, str], on: bool) -> None:  # noqa: FBT001
    assert tracing.configure_from_env(environ) is on
    assert tracing.enabled() is on


def test_off_nothing_is_injected_and_on_the_context_round_trips_through_headers() -> None:
    headers: dict[str, object] = {}
    tracing.inject(headers)
    assert headers == {}
    with tracing.span("nothing") as made:
        assert made is None
    tracing.use(TracerProvider())
    with tracing.span("caller") as made:
        assert made is not None
        tracing.inject(headers)
    assert str(headers["traceparent"]).startswith("00-")
    # AMQP hands header values back as bytes: the context is read all the same.
    received = {k: str(v).encode() for k, v in headers.items()}
    context = tracing.extract(received)
    with tracing.span("worker", parent=context) as child:
        assert child is not None
        assert child.get_span_context().trace_id == made.get_span_context().trace_id


@pytest.mark.parametrize(
    ("environ", "refused"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s3"}, True),
        (
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://vendor.example/v1/traces",
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "a=b",
            },
            True,
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://vendor.example", "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s3"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s3"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),  # no credentials to leak
    ],
)
def test_the_exporters_headers_never_travel_in_clear_off_this_machine(
    environ: dict[str, str],
    refused: bool,  # noqa: FBT001
) -> None:
    if refused:
        with pytest.raises(ConfigError, match="would send these headers in clear; use https://"):
            tracing.configure_from_env(environ)
        assert not tracing.enabled()
    else:
        assert tracing.configure_from_env(environ)


def test_config_shows_the_otel_variables_with_their_headers_masked() -> None:
    shown = tracing.shown_settings(
        {
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s3cret,x-team=t0ken",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "https://u:pw@vendor.example?sig=abc",
            "OTEL_SERVICE_NAME": "tokens",
            "PATH": "/bin",
        }
    )
    assert shown == [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://u:********@vendor.example/?sig=********"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=********,x-team=********"),
        ("OTEL_SERVICE_NAME", "tokens"),
    ]
