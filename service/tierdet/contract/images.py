"""An image sent already decoded, beside encoded bytes: what the use case takes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pixels:
    """``height`` x ``width`` x 3 RGB bytes, row-major (the Open Inference
    Protocol's UINT8 ``[H, W, 3]`` tensor)."""

    data: bytes
    width: int
    height: int

    def __len__(self) -> int:  # what the access log and spans count as the image's bytes
        return len(self.data)
