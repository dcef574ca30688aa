"""OpenTelemetry traces of detect requests.

An API call is a server span (parent: the caller's W3C ``traceparent``), with
a child ``admission`` and, per image, ``detect`` with a child per stage:
``decode``, ``route``, ``preprocess``, ``triton`` (the call to the chosen
endpoint; its ``traceparent`` goes to Triton, which continues the trace when it
runs with ``--trace-config mode=opentelemetry``) and ``postprocess``.
Attributes say what the router did: model, endpoint, tier, budget, predicted
and actual ms, outcome code, tiles.

On only when an OTLP endpoint is configured by the standard variables
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``;
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keep it off). The
exporter itself reads the rest (headers, TLS, ``OTEL_SERVICE_NAME``, the
sampler); the protocol is OTLP over gRPC. Off, ``span()`` is a shared no-op: no
OpenTelemetry call is made on the request path.

Whether tracing is on or not, a request that brings a ``traceparent`` gets
its trace id back (``X-Trace-Id``), so a caller can find the trace.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

TRACE_ID_HEADER = "x-trace-id"  # the trace id back to the caller (HTTP and gRPC)
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_OFF = contextlib.nullcontext()
_tracer: Any = None  # an opentelemetry Tracer once configured


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent``, None if there is none or it is malformed."""
    if not traceparent:
        return None
    match = _TRACEPARENT.fullmatch(traceparent.strip())
    if match is None or match.group(1) == "0" * 32:
        return None
    return match.group(1)


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure(service_name: str = "tierdet-gateway") -> bool:
    """Export spans over OTLP if the environment asks for it; returns whether on."""
    global _tracer
    if not wanted():
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                              os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    if protocol != "grpc":
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: the gateway exports "
                         "OTLP over gRPC only (port 4317 of a collector)")
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME",
                                                             service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("tierdet")
    return True


def shutdown() -> None:
    """Send what is buffered (at the gateway's stop)."""
    if _tracer is not None:
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
        if hasattr(provider, "shutdown"):
            provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def _server(name: str, carrier: Mapping[str, str]) -> Iterator[Any]:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract(carrier)
    with _tracer.start_as_current_span(name, context=parent,
                                       kind=trace.SpanKind.SERVER) as current:
        yield current


def server_span(name: str, carrier: Mapping[str, str]) -> contextlib.AbstractContextManager:
    """The span of a whole call, child of the ``traceparent`` in ``carrier``."""
    return _server(name, carrier) if _tracer is not None else _OFF


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager:
    """A child of the current span (a stage), or the no-op when tracing is off."""
    if _tracer is None:
        return _OFF
    return _tracer.start_as_current_span(name, attributes=_clean(attributes))


def annotate(**attributes: Any) -> None:
    """Attributes on the current span (what became known during it)."""
    if _tracer is not None:
        from opentelemetry import trace

        trace.get_current_span().set_attributes(_clean(attributes))


def headers() -> dict[str, str] | None:
    """The current span as a ``traceparent`` header for the next hop (Triton)."""
    if _tracer is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier or None


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {f"tierdet.{k}": v for k, v in attributes.items() if v is not None}
