"""The request options, defined once.

``DetectOptions`` is the single definition. Everything else is derived from
its fields: HTTP form, query and JSON parsing and the OpenAPI schema
(``tierdet.frontends.http_requests``), the gRPC mapping (``tierdet.contract.wire``;
a test fails if ``protos/detection.proto`` disagrees), the Python client's
keyword arguments, the CLI flags (``tierdet detect --help``) and the web
page's fields (built from ``/openapi.json``). Adding an option here adds it
everywhere; only the proto needs its field added by hand.

Field order is the order surfaces list them in. ``title`` is the label a form
shows; ``json_schema_extra`` may carry ``x-choices`` ("tiers" or "models":
the web page fills a list from ``/v1/models``) and ``x-placeholder``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
MAX_CLASSES = 100

ClassName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                             max_length=64)]


class DetectOptions(BaseModel):
    """Per-request options, the same on every surface (HTTP, gRPC, client, CLI, page)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tier: str | None = Field(
        None, min_length=1, max_length=64, pattern=NAME_PATTERN, title="Tier",
        description="A named tier (budget + allowed models); `GET /v1/models` lists them.",
        json_schema_extra={"x-choices": "tiers", "x-placeholder": "server default"})
    sla_ms: float | None = Field(
        None, gt=0, le=600_000, title="Budget (ms)",
        description="Latency budget in ms, end to end at the gateway.",
        json_schema_extra={"x-placeholder": "the tier's budget"})
    model: str | None = Field(
        None, min_length=1, max_length=64, pattern=NAME_PATTERN, title="Model",
        description="Pin a model by name instead of letting the router choose.",
        json_schema_extra={"x-choices": "models", "x-placeholder": "chosen by the router"})
    score_threshold: float | None = Field(
        None, ge=0.0, le=1.0, title="Minimum score",
        description="Drop detections scoring below this (default: the server's).",
        json_schema_extra={"x-placeholder": "server default"})
    max_detections: int | None = Field(
        None, ge=1, le=1000, title="Max detections",
        description="Return at most this many detections (after the class filter and "
                    "the score threshold).",
        json_schema_extra={"x-placeholder": "all"})
    classes: tuple[ClassName, ...] | None = Field(
        None, min_length=1, max_length=MAX_CLASSES, title="Classes",
        description="Keep only these classes: names or category ids (comma-separated in "
                    "form and query fields, a list in JSON and gRPC); an unknown one is "
                    "refused.",
        json_schema_extra={"x-placeholder": "all, e.g. person,car"})
    tile: Literal["auto", "off"] | None = Field(
        None, title="Tiling",
        description="`auto`: an image at least twice the model's input on its long side is "
                    "also run as overlapping tiles in the same batch (small objects survive "
                    "the resize), boxes merged; as many tiles as the budget allows, "
                    "`routing.tiles` says how many. `off` or absent: the whole image only.",
        json_schema_extra={"x-placeholder": "off"})

    @field_validator("classes", mode="before")
    @classmethod
    def _ids_as_text(cls, value: Any) -> Any:
        # A JSON list may hold category ids as numbers: they name a class like text.
        if isinstance(value, list | tuple):
            return tuple(str(v) if isinstance(v, int) and not isinstance(v, bool) else v
                         for v in value)
        return value


def _takes_several(annotation: Any) -> bool:
    return any(get_origin(a) is tuple for a in (get_args(annotation) or (annotation,)))


OPTION_NAMES: tuple[str, ...] = tuple(DetectOptions.model_fields)
# Options that take several values (lists in JSON and gRPC, comma-separated text).
LIST_OPTIONS: frozenset[str] = frozenset(
    name for name, info in DetectOptions.model_fields.items() if _takes_several(info.annotation))
