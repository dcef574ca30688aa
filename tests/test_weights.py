"""Official weights: downloaded over real HTTP, sha256-verified, cached."""

import dataclasses
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
from tierdet.build.weights import WeightsError, WeightsSource, download, resolve_checkpoint
from tierdet.registry.specs import SPECS, ZOO, OfficialWeights

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture()
def file_server(tmp_path):
    """A real HTTP server on loopback serving tmp_path/served; counts GETs."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "ckpt.pth").write_bytes(PAYLOAD)
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def test_download_verifies_and_caches(file_server, tmp_path):
    base, hits = file_server
    good = hashlib.sha256(PAYLOAD).hexdigest()
    dest = tmp_path / "cache" / "ckpt.pth"
    assert download(f"{base}/ckpt.pth", good, dest, progress=False).read_bytes() == PAYLOAD
    download(f"{base}/ckpt.pth", good, dest, progress=False)
    assert len(hits) == 1  # the second call used the verified cache


def test_wrong_digest_is_refused_and_not_cached(file_server, tmp_path):
    base, _ = file_server
    dest = tmp_path / "cache" / "ckpt.pth"
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        download(f"{base}/ckpt.pth", "0" * 64, dest, progress=False)
    assert not dest.exists() and not list(dest.parent.glob("*.part"))


def test_missing_file_is_a_clear_error(file_server, tmp_path):
    base, _ = file_server
    with pytest.raises(WeightsError, match="404"):
        download(f"{base}/nope.pth", "0" * 64, tmp_path / "x.pth", progress=False)


def test_official_source_goes_through_the_spec(file_server, tmp_path):
    base, _ = file_server
    spec = dataclasses.replace(SPECS["efficientdet-d0"], official_weights=OfficialWeights(
        f"{base}/ckpt.pth", hashlib.sha256(PAYLOAD).hexdigest()))
    path = resolve_checkpoint(spec, WeightsSource.parse("official"), tmp_path, progress=False)
    assert path == tmp_path / "ckpt.pth" and path.read_bytes() == PAYLOAD


def test_weights_argument_forms(tmp_path):
    assert WeightsSource.parse("random").seed == 0
    assert WeightsSource.parse("random:7").seed == 7
    assert "NOT trained" in WeightsSource.parse("random:7").describe()
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"x")
    assert WeightsSource.parse(str(ckpt)) == WeightsSource("file", path=Path(ckpt))
    with pytest.raises(WeightsError):
        WeightsSource.parse("random:x")
    with pytest.raises(WeightsError):
        WeightsSource.parse(str(tmp_path / "missing.pth"))


def test_a_published_prefix_is_checked(file_server, tmp_path):
    """D5-D7 publish only the first 8 hex digits (in the file name): they are
    checked, a wrong prefix is refused, and a cached copy is re-checked."""
    base, hits = file_server
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    dest = tmp_path / "cache" / "ckpt.pth"
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        download(f"{base}/ckpt.pth", "0" * 8, dest, progress=False)
    assert not dest.exists()
    assert download(f"{base}/ckpt.pth", digest[:8], dest, progress=False).read_bytes() == PAYLOAD
    download(f"{base}/ckpt.pth", digest[:8], dest, progress=False)
    assert len(hits) == 2  # the refused fetch, then the good one; the third call hit the cache
    dest.write_bytes(b"tampered")
    download(f"{base}/ckpt.pth", digest[:8], dest, progress=False)
    assert dest.read_bytes() == PAYLOAD and len(hits) == 3


def test_no_published_digest_downloads_and_logs_the_digest(file_server, tmp_path, caplog):
    base, _ = file_server
    with caplog.at_level("WARNING", logger="tierdet.build.weights"):
        path = download(f"{base}/ckpt.pth", "", tmp_path / "ckpt.pth", progress=False)
    assert path.read_bytes() == PAYLOAD
    assert hashlib.sha256(PAYLOAD).hexdigest() in caplog.text
    assert "nothing was verified" in caplog.text


@pytest.mark.parametrize("digest", ["f153e0c", "F153E0CF", "x" * 64, "0" * 65])
def test_malformed_digests_are_refused_in_the_spec(digest):
    with pytest.raises(ValueError):
        OfficialWeights("https://example.org/w.pth", digest)


def test_digest_kinds_of_the_registry():
    kinds = {name: spec.official_weights.digest_kind for name, spec in ZOO.items()}
    assert {kinds[f"efficientdet-d{i}"] for i in range(5)} == {"sha256"}
    assert {kinds[f"efficientdet-d{i}"] for i in (5, 6, 7)} == {"sha256-prefix"}
    assert {k for n, k in kinds.items() if n.startswith("damoyolo-")} == {"none"}
    for spec in ZOO.values():
        # effdet's file names carry the digest's first 8 hex digits (torch.hub style).
        fragment = spec.official_weights.filename.rsplit("-", 1)[-1].removesuffix(".pth")
        if spec.name.startswith("efficientdet-"):
            assert spec.official_weights.sha256.startswith(fragment)


def test_offline_build_says_in_one_line_which_download_failed_and_what_to_do(
        tmp_path, monkeypatch, capsys):
    """As a new user without network meets it: `tierdet build --weights official`
    (and `./dev up`, which runs the same build) ends with one line and exit 2."""
    from tierdet import cli
    from tierdet.devstack.stack import free_port

    url = f"http://127.0.0.1:{free_port()}/tf_efficientdet_d0_34-f153e0cf.pth"  # nobody there
    spec = SPECS["efficientdet-d0"]
    monkeypatch.setitem(SPECS, spec.name, dataclasses.replace(
        spec, official_weights=OfficialWeights(url, spec.official_weights.sha256)))
    code = cli.main(["--home", str(tmp_path), "build", "--weights", "official",
                     "--models", spec.name])
    # stderr also carries the build's progress bar; the error is one line, the last.
    lines = capsys.readouterr().err.strip().replace("\r", "\n").splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2 and errors == lines[-1:], lines
    err = errors[0]
    assert not any("Traceback" in line for line in lines)
    assert f"download of {url} failed" in err and "Connection refused" in err
    assert "--weights PATH" in err and "--weights random" in err
