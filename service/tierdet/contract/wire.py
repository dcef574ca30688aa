"""The one mapping between the contract's types and their wire forms.

- text fields (HTTP form and query, and what the client sends): an option per
  field, several values comma-separated;
- protobuf (``protos/detection.proto``): options to and from ``DetectRequest``,
  results to and from their messages, field by field by name;
- JSON (what the client reads): the dataclasses of ``results``, validated.

Both the gateway and the client call these, so a field cannot be spelt two ways.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from pydantic import TypeAdapter

from tierdet.contract.errors import ApiError
from tierdet.contract.options import LIST_OPTIONS, OPTION_NAMES, DetectOptions
from tierdet.contract.results import ErrorInfo, FrameResult
from tierdet.proto import detection_pb2 as pb

T = TypeVar("T")


# -- text fields ---------------------------------------------------------------


def options_to_fields(options: DetectOptions) -> dict[str, str]:
    """The options that are set, as text fields (lists comma-separated)."""
    out = {}
    for name, value in options.model_dump(exclude_none=True).items():
        out[name] = ",".join(map(str, value)) if name in LIST_OPTIONS else str(value)
    return out


def options_from_fields(given: Mapping[str, str]) -> dict[str, Any]:
    """Text fields -> values for ``DetectOptions`` (lists split at commas). Names that
    are not options pass through, so validation refuses them by name."""
    return {name: [v for v in text.split(",") if v.strip()] if name in LIST_OPTIONS else text
            for name, text in given.items()}


# -- protobuf -------------------------------------------------------------------


def options_to_message(options: DetectOptions, image: bytes) -> pb.DetectRequest:
    request = pb.DetectRequest(image=image)
    for name, value in options.model_dump(exclude_none=True).items():
        if name in LIST_OPTIONS:
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    return request


def options_from_message(request: pb.DetectRequest) -> dict[str, Any]:
    """Values for ``DetectOptions`` from a request; unset fields are left out."""
    values: dict[str, Any] = {}
    for name in OPTION_NAMES:
        descriptor = request.DESCRIPTOR.fields_by_name[name]
        if name in LIST_OPTIONS:
            value: Any = list(getattr(request, name)) or None
        elif descriptor.has_presence:
            value = getattr(request, name) if request.HasField(name) else None
        else:  # a proto3 string without presence: empty means unset
            value = getattr(request, name) or None
        if value is not None:
            values[name] = value
    return values


def to_message(obj: Any, message: Any) -> Any:
    """Fill ``message`` from the dataclass ``obj`` (same field names); returns it."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        target = getattr(message, f.name)
        if is_dataclass(value):
            target.SetInParent()
            to_message(value, target)
        elif isinstance(value, tuple) and value and is_dataclass(value[0]):
            for item in value:
                to_message(item, target.add())
        elif isinstance(value, tuple):
            target.extend(value)
        elif isinstance(value, dict):
            target.update(value)
        else:
            setattr(message, f.name, value)
    return message


def from_message(cls: type[T], message: Any) -> T:
    """The dataclass ``cls`` read from ``message`` (same field names)."""
    hints = _hints(cls)  # type: ignore[arg-type]  # a class is hashable
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        kind, optional = _unwrap(hints[f.name])
        descriptor = message.DESCRIPTOR.fields_by_name[f.name]
        if optional and descriptor.has_presence and not message.HasField(f.name):
            values[f.name] = None
            continue
        value = getattr(message, f.name)
        if isinstance(kind, type) and is_dataclass(kind):
            value = from_message(kind, value)
        elif get_origin(kind) is tuple:
            item = get_args(kind)[0]
            value = tuple(from_message(item, v) if isinstance(item, type) and is_dataclass(item)
                          else v for v in value)
        elif get_origin(kind) is dict:
            value = dict(value)
        elif optional and value == "":
            value = None
        values[f.name] = value
    return cls(**values)


def error_info(exc: ApiError) -> ErrorInfo:
    return ErrorInfo(exc.code.value, exc.message, exc.retry_after_s)


def frame_to_message(result: FrameResult) -> pb.DetectFrameResult:
    message = pb.DetectFrameResult(frame_id=result.frame_id)
    if result.error is not None:
        to_message(result.error, message.error)
    elif result.result is not None:
        to_message(result.result, message.response)
    return message


def frame_from_message(message: pb.DetectFrameResult) -> FrameResult:
    from tierdet.contract.results import DetectResult

    if message.WhichOneof("outcome") == "error":
        return FrameResult(message.frame_id, None, from_message(ErrorInfo, message.error))
    return FrameResult(message.frame_id, from_message(DetectResult, message.response), None)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of ``X | None``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(get_args(annotation))
    return annotation, False


# -- JSON -------------------------------------------------------------------


def from_json(cls: type[T], data: Any) -> T:
    """The dataclass ``cls`` from decoded JSON (fields a newer gateway adds are ignored)."""
    return _adapter(cls).validate_python(data)  # type: ignore[arg-type]  # hashable


@functools.cache
def _adapter(cls: type) -> TypeAdapter[Any]:
    return TypeAdapter(cls)
