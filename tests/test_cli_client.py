"""`tierdet detect` and `tierdet models` against the real stack; --help everywhere."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import TEST_MODEL, encode, photos
from tierdet import cli
from tierdet.devstack.stack import free_port


def test_detect_prints_a_table_and_writes_the_boxed_image(gateway, tmp_path):
    photo, out = tmp_path / "photo.jpg", tmp_path / "boxed.png"
    photo.write_bytes(encode(photos()["astronaut"]))
    # The installed entry point, as a user runs it.
    run = subprocess.run(
        [sys.executable, "-m", "tierdet.cli", "detect", str(photo), "--out", str(out),
         "--url", gateway.http, "--tier", "accurate", "--score-threshold", "0.05",
         "--max-detections", "4"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert re.match(rf"{TEST_MODEL}: 4 detection\(s\) in 512x512, \d+ ms "
                    r"\(tier accurate, budget 3000 ms\)", lines[0])
    assert lines[1].split() == ["#", "class", "score", "x1", "y1", "x2", "y2"]
    rows = [line.split() for line in lines[2:6]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    assert lines[6] == f"wrote {out}"
    drawn = cv2.imread(str(out))
    assert drawn.shape == (512, 512, 3) and out.read_bytes().startswith(b"\x89PNG")
    changed = np.abs(drawn[..., ::-1].astype(int) - photos()["astronaut"]).sum(axis=2) > 60
    assert changed.mean() > 0.002  # the boxes are there


def test_detect_json_and_pinned_model(gateway, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(photos()["coffee"], ".png"))
    assert cli.main(["detect", str(photo), "--url", gateway.http, "--model", TEST_MODEL,
                     "--sla-ms", "5000", "--json", "--max-detections", "2",
                     "--score-threshold", "0.05"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["model"] == TEST_MODEL and len(body["detections"]) == 2
    assert body["routing"]["tier"] is None and body["routing"]["budget_ms"] == 5000


def test_detect_errors_are_readable(gateway, tmp_path, capsys):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    assert cli.main(["detect", str(junk), "--url", gateway.http]) == 1
    assert "error: unsupported_media_type:" in capsys.readouterr().err
    assert cli.main(["detect", str(tmp_path / "missing.jpg"), "--url", gateway.http]) == 2
    assert "cannot read" in capsys.readouterr().err
    url = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["detect", str(junk), "--url", url, "--timeout-s", "2"]) == 1
    err = capsys.readouterr().err
    assert "connection_failed" in err and "tierdet up" in err


def test_models_lists_readiness_weights_ap_and_tiers(gateway, capsys):
    assert cli.main(["models", "--url", gateway.http]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith(TEST_MODEL)]
    # The AP the router ranks it by: random weights rank 0, whatever is published.
    assert row.split()[1:4] == ["yes", "0.0", "512"] and "random" in row
    assert re.search(r"^balanced \(default\)\s+500 ms", out, re.M)
    assert cli.main(["models", "--url", gateway.http, "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in body["models"]} >= {TEST_MODEL}
    assert {t["name"] for t in body["tiers"]} >= {"realtime", "balanced", "accurate"}


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("name", ["build", "generate", "up", "profile", "serve", "detect",
                                  "models"])
def test_gateway_subcommands_document_every_option(name):
    sub = _subparsers(cli.parser())[name]
    assert sub.description and len(sub.description) > 40
    for action in sub._actions:
        assert action.help, f"tierdet {name}: {action.option_strings or action.dest} has no help"


def test_every_subcommand_has_a_summary_and_a_working_help(capsys):
    parser = cli.parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    summaries = {c.dest: c.help for c in action._choices_actions}
    for name in action.choices:
        assert summaries.get(name), f"tierdet {name} has no summary in `tierdet --help`"
        with pytest.raises(SystemExit) as info:
            cli.main([name, "--help"])
        assert info.value.code == 0
        assert "usage: tierdet " + name in capsys.readouterr().out
