"""``tierdet admin models list|put|delete|promote|rollback``: models that change
while serving, through a running gateway's admin API (``/admin/models``,
``X-Admin-Key``); ``put --canary SHARE`` stages a replacement as a canary."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ADMIN_KEY_ENV = "TIERDET_ADMIN_KEY"
HEADER = "X-Admin-Key"


def _call(args: argparse.Namespace, method: str, path: str, body: bytes | None = None
          ) -> int:
    """One admin call; prints the models it answers with, or its error."""
    import json
    import urllib.error
    import urllib.request

    key = args.admin_key or os.environ.get(ADMIN_KEY_ENV)
    if not key:
        print(f"error: the admin credential: --admin-key or {ADMIN_KEY_ENV}", file=sys.stderr)
        return 2
    request = urllib.request.Request(args.url.rstrip("/") + path, data=body, method=method,
                                     headers={HEADER: key, "Content-Type": "application/yaml"})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout_s) as answer:
            reply: dict[str, Any] = json.loads(answer.read())
    except urllib.error.HTTPError as exc:  # the gateway's refusal: its code and message
        error = json.loads(exc.read() or b"{}").get("error", {})
        print(f"error: {error.get('code')}: {error.get('message')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {args.url}: {exc}", file=sys.stderr)
        return 1
    print(f"{'model':<28}{'state':<10}{'card':<20}reason")
    for m in reply["models"]:
        print(f"{m['name']:<28}{m['state']:<10}{m['card'] or '-':<20}{m['reason']}")
    for m in reply["models"]:
        if (c := m.get("canary")) is not None:
            print(f"canary of {m['name']}: {c['model']} at {c['share']:g}, {c['state']}"
                  f"{' by the ' + c['decided_by'] if c['decided_by'] else ''}; pairs "
                  f"{c['pairs']}, agreement drop {c['agreement_drop']}; samples "
                  f"{c['samples']} / {c['old_samples']}, agreement {c['agreement']} / "
                  f"{c['old_agreement']}, p99 {c['p99_ms']} / {c['old_p99_ms']} ms")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    return _call(args, "GET", "/admin/models")


def cmd_put(args: argparse.Namespace) -> int:
    from tierdet.registry.cards import CardError, card_mapping

    try:
        text = args.card.read_bytes()
        name = args.name or card_mapping(text.decode("utf-8"), args.card).get("name")
    except (OSError, UnicodeDecodeError, CardError) as exc:
        print(f"error: {args.card}: {exc}", file=sys.stderr)
        return 2
    if not name:
        print(f"error: {args.card} names no model: --name NAME", file=sys.stderr)
        return 2
    query = f"?canary={args.canary}" if args.canary is not None else ""
    return _call(args, "PUT", f"/admin/models/{name}{query}", text)


def cmd_delete(args: argparse.Namespace) -> int:
    return _call(args, "DELETE", f"/admin/models/{args.name}")


def cmd_promote(args: argparse.Namespace) -> int:
    return _call(args, "POST", f"/admin/models/{args.name}/canary/promote")


def cmd_rollback(args: argparse.Namespace) -> int:
    return _call(args, "POST", f"/admin/models/{args.name}/canary/rollback")


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("admin", help="change a running gateway's models (admin API)",
                       description="Add, replace and retire models while the gateway serves, "
                                   "through its admin API (the admin credential only).")
    nouns = a.add_subparsers(dest="noun", required=True)
    models = nouns.add_parser("models", help="list, add or replace, retire models")
    verbs = models.add_subparsers(dest="verb", required=True)
    ls = verbs.add_parser("list", help="each model's state (serving, building, loading, "
                                       "draining, retired, failed)")
    ls.set_defaults(func=cmd_list)
    put = verbs.add_parser("put", help="add a card's models, or replace them",
                           description="Send CARD (YAML) to the gateway: its graph is read "
                                       "from the gateway's cards folder (TIERDET_CARDS_DIR), "
                                       "relative to it. Answers once the models serve.")
    put.add_argument("card", type=Path, help="the model card (YAML)")
    put.add_argument("--name", help="the card's name (default: its name field)")
    put.add_argument("--canary", type=float, metavar="SHARE",
                     help="stage the replacement as a canary on this share (0..1) of the "
                          "model's requests, judged by the gateway's rule")
    put.set_defaults(func=cmd_put)
    rm = verbs.add_parser("delete", help="retire a card's models (or one model)",
                          description="Stop routing to them, wait for their requests, unload.")
    rm.add_argument("name", help="a card the admin API added, or a served model")
    rm.set_defaults(func=cmd_delete)
    promote = verbs.add_parser("promote", help="promote a model's running canary",
                               description="The canary's card replaces the model; the "
                                           "canary drains and is unloaded.")
    promote.set_defaults(func=cmd_promote)
    rollback = verbs.add_parser("rollback", help="roll a model's running canary back",
                                description="The canary drains and is unloaded.")
    rollback.set_defaults(func=cmd_rollback)
    for verb in (promote, rollback):
        verb.add_argument("name", help="the model the canary would replace")
    for verb in (ls, put, rm, promote, rollback):
        verb.add_argument("--url", default=os.environ.get("TIERDET_URL",
                                                          "http://127.0.0.1:8080"),
                          help="the gateway's HTTP address (env TIERDET_URL)")
        verb.add_argument("--admin-key", help=f"the admin credential (env {ADMIN_KEY_ENV})")
        verb.add_argument("--timeout-s", type=float, default=900.0,
                          help="HTTP timeout (default 900: a put waits for the build)")
