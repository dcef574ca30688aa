"""Where a model's weights come from: official download, a local file, or random.

Downloads are verified against the spec's sha256 before they enter the
cache, written to a temporary file and renamed, so an interrupted or
tampered download never poisons the cache. Where only a digest prefix is
published the check covers that prefix (weaker, as in torch.hub); where no
digest is published at all the file is taken as served and its sha256 is
logged and recorded in the build's provenance, so it can be pinned.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from tierdet.registry.cards import sha256_file
from tierdet.registry.specs import ModelSpec

CHUNK = 1 << 20
log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    pass


@dataclass(frozen=True)
class WeightsSource:
    """``official``, ``random[:SEED]`` or a checkpoint path, as the CLI spells it."""

    kind: Literal["official", "file", "random"]
    path: Path | None = None
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> WeightsSource:
        if text == "official":
            return cls("official")
        if text == "random" or text.startswith("random:"):
            _, _, seed = text.partition(":")
            try:
                return cls("random", seed=int(seed or 0))
            except ValueError:
                raise WeightsError(f"bad seed in {text!r}: expected random:<int>") from None
        path = Path(text).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights must be 'official', 'random[:SEED]' or a file; "
                               f"{text!r} is none of these")
        return cls("file", path=path)

    def describe(self) -> str:
        """Human-readable provenance, shown in /v1/models and the start-up log."""
        if self.kind == "random":
            return f"random (seed {self.seed}): NOT trained, detections are meaningless"
        if self.kind == "file":
            return f"file {self.path}"
        return "official"


def digest_matches(actual: str, expected: str) -> bool:
    """``expected`` is a full sha256, a prefix of one, or empty (nothing known)."""
    return actual.startswith(expected)


def download(url: str, sha256: str, dest: Path, timeout_s: float = 60.0,
             progress: bool = True) -> Path:
    """Fetch ``url`` to ``dest`` unless a verified copy is already there.

    ``sha256`` is the full digest, a published prefix of it, or "" when
    none is published (then nothing can be verified: the digest is logged).
    """
    if dest.is_file() and digest_matches(sha256_file(dest), sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, part.open("wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                      disable=not progress) as bar:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        reason = (f"HTTP {exc.code} {exc.reason}" if isinstance(exc, urllib.error.HTTPError)
                  else getattr(exc, "reason", None) or exc)
        raise WeightsError(
            f"download of {url} failed ({reason}); without network, build from a local "
            "checkpoint (--weights PATH) or untrained weights (--weights random)") from None
    if not digest_matches(digest.hexdigest(), sha256):
        part.unlink(missing_ok=True)
        raise WeightsError(f"sha256 mismatch for {url}: got {digest.hexdigest()}, "
                           f"expected {sha256}; the file was discarded")
    if len(sha256) < 64:
        log.warning("%s: %s; sha256 of the file is %s", url,
                    f"only the sha256 prefix {sha256} is published and was checked"
                    if sha256 else "no sha256 is published, nothing was verified",
                    digest.hexdigest())
    part.replace(dest)
    return dest


def resolve_checkpoint(spec: ModelSpec, source: WeightsSource, cache_dir: Path,
                       progress: bool = True) -> Path | None:
    """The checkpoint file to load, or None for random weights."""
    if source.kind == "random":
        return None
    if source.kind == "file":
        return source.path
    if spec.official_weights is None:
        from tierdet.registry.trained import CHECKPOINTS

        hint = f" (it ships in the repository: {CHECKPOINTS[spec.name]})" \
            if spec.name in CHECKPOINTS else ""
        raise WeightsError(f"{spec.name} has no official weights; use a checkpoint file"
                           f"{hint} or random")
    official = spec.official_weights
    return download(official.url, official.sha256, cache_dir / official.filename,
                    progress=progress)
