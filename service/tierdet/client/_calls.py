"""The one request builder: what every client sends, for every call.

``HttpCalls`` gives each HTTP call as the arguments of one ``httpx`` request
plus the function that reads its answer; ``grpc_request`` and ``grpc_frame``
build the protobuf messages. Options are validated here, against
``DetectOptions``, before anything is sent. The sync and async clients only
move bytes and wait.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from tierdet.client._errors import TierdetError
from tierdet.contract import wire
from tierdet.contract.errors import first_problem
from tierdet.contract.options import DetectOptions
from tierdet.contract.results import BatchItem, BatchResult, DetectResult, ModelsInfo
from tierdet.proto import detection_pb2 as pb

T = TypeVar("T")
ImageInput = bytes | str | os.PathLike[str]


def read_image(image: ImageInput) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    return Path(image).read_bytes()


def detect_options(values: Mapping[str, Any]) -> DetectOptions:
    """``values`` as options, checked before anything is sent: a bad one is the
    ``TierdetError`` the gateway would answer (``invalid_option``), with no attempt."""
    try:
        return DetectOptions(**values)
    except ValidationError as exc:
        raise TierdetError("invalid_option", first_problem(exc.errors()), attempts=0) from None


class Frame:
    """One frame of a stream; options given here win over the stream's."""

    def __init__(self, image: bytes, frame_id: int | None = None, **options: Any) -> None:
        self.image = image
        self.frame_id = frame_id  # default: the frame's position in the stream
        self.options = detect_options(options)


@dataclass(frozen=True)
class HttpCall(Generic[T]):
    request: dict[str, Any]  # keyword arguments of httpx's request()
    read: Callable[[Any], T]  # the successful httpx.Response -> the answer


class HttpCalls:
    def __init__(self, api_key: str | None) -> None:
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def detect(self, image: ImageInput, options: Mapping[str, Any]) -> HttpCall[DetectResult]:
        return HttpCall(self._detect_request(image, options, None),
                        lambda r: wire.from_json(DetectResult, r.json()))

    def render(self, image: ImageInput, fmt: str, options: Mapping[str, Any]
               ) -> HttpCall[bytes]:
        return HttpCall(self._detect_request(image, options, fmt), lambda r: r.content)

    def batch(self, images: Sequence[ImageInput], options: Mapping[str, Any]
              ) -> HttpCall[list[BatchItem]]:
        files = [("images", (_name(i, image), read_image(image), "application/octet-stream"))
                 for i, image in enumerate(images)]
        request = {"method": "POST", "url": "/v1/detect/batch", "headers": self.auth,
                   "files": files, "data": wire.options_to_fields(detect_options(options))}
        return HttpCall(request, lambda r: list(wire.from_json(BatchResult, r.json()).results))

    def models(self) -> HttpCall[ModelsInfo]:
        return HttpCall({"method": "GET", "url": "/v1/models", "headers": self.auth},
                        lambda r: wire.from_json(ModelsInfo, r.json()))

    def _detect_request(self, image: ImageInput, options: Mapping[str, Any],
                        render: str | None) -> dict[str, Any]:
        params = wire.options_to_fields(detect_options(options))
        headers = {**self.auth, "Content-Type": "application/octet-stream"}
        if render is not None:
            params["render"] = "true"
            headers["Accept"] = "image/png" if render == "png" else "image/jpeg"
        return {"method": "POST", "url": "/v1/detect", "params": params,
                "content": read_image(image), "headers": headers}


def _name(index: int, image: ImageInput) -> str:
    if isinstance(image, bytes | bytearray | memoryview):
        return f"image-{index}"
    return Path(image).name


def grpc_request(image: ImageInput, options: Mapping[str, Any]) -> pb.DetectRequest:
    return wire.options_to_message(detect_options(options), read_image(image))


def grpc_frame(position: int, frame: bytes | Frame, defaults: DetectOptions) -> pb.DetectFrame:
    if not isinstance(frame, Frame):
        frame = Frame(bytes(frame))
    own = frame.options.model_dump(exclude_none=True)
    options = defaults.model_copy(update=own)
    return pb.DetectFrame(frame_id=position if frame.frame_id is None else frame.frame_id,
                          request=wire.options_to_message(options, frame.image))
