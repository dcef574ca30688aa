"""Measure the peak memory of decoding each image given, in this process.

Run as a script (a fresh interpreter, so nothing else shares its peak):
``python peak_probe.py LIMIT_PIXELS FILE...`` prints one JSON line per file:
the resident-set peak of its decode above the RSS before it (the kernel's
VmHWM, reset through /proc/self/clear_refs before each), the decoder's own
estimate (``decoding.peak_bytes``) and the refusal's code, if refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import sys
from pathlib import Path


def _status(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main() -> None:
    from tierdet.contract.errors import ApiError
    from tierdet.serving import decoding
    from tierdet.serving.headers import read_header, sniff_format

    libc = ctypes.CDLL(None)
    limit = int(sys.argv[1])
    for path in sys.argv[2:]:  # every codec's code paged in before anything is measured
        with contextlib.suppress(ApiError):
            decoding.decode(Path(path).read_bytes(), 1 << 62, limit)
    for path in sys.argv[2:]:
        data = Path(path).read_bytes()
        fmt = sniff_format(data)
        header = read_header(data, fmt) if fmt else None
        estimate = decoding.peak_bytes(header) if header else 0
        gc.collect()
        libc.malloc_trim(0)  # what earlier decodes freed leaves the resident set
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status("VmRSS")
        code = None
        try:
            image = decoding.decode(data, len(data), limit)
            del image
        except ApiError as exc:
            code = exc.code.value
        peak = _status("VmHWM") - before
        print(json.dumps({"file": Path(path).name, "peak": peak, "estimate": estimate,
                          "code": code}), flush=True)


if __name__ == "__main__":
    main()
