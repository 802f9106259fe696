"""Users and API keys: `gpumesh users add|ls|rm`, `gpumesh keys create|ls|revoke`."""

from __future__ import annotations

import argparse
import calendar
import re
import time
import urllib.parse
from typing import Any

from .output import Exit, add_client_command, add_group, client_for, print_result, table

__all__ = ["register", "parse_expiry"]

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([mhdw])$")
_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(value: str) -> float:
    """`30d`, `12h`, `2w`, `90m` from now, or a date `2027-01-31` (UTC midnight)."""
    if match := _AGE.match(value.strip()):
        return time.time() + float(match.group(1)) * _SECONDS[match.group(2)]
    try:
        return float(calendar.timegm(time.strptime(value.strip(), "%Y-%m-%d")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an age such as 30d, 12h, 2w, 90m, or a "
                                         f"date YYYY-MM-DD, not {value!r}") from None


def _limits(args: argparse.Namespace) -> dict[str, int] | None:
    limits = {name: getattr(args, name) for name in ("rpm", "tpm", "concurrency")
              if getattr(args, name) is not None}
    return limits or None


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp)) if timestamp else "never"


def _limits_label(limits: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (limits or {}).items()) or "-"


# --- users --------------------------------------------------------------------------------

def cmd_users_add(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "role": args.role}
    if limits := _limits(args):
        body["limits"] = limits
    user = client_for(args).post("/api/users", body)
    print_result(args, user, lambda u: f"added {u['role']} {u['id']}"
                 + (f" (limits: {_limits_label(u.get('limits'))})" if u.get("limits") else "")
                 + f"; give it a key: gpumesh keys create --user {u['id']}")
    return Exit.OK


def cmd_users_ls(args: argparse.Namespace) -> int:
    users = client_for(args).get("/api/users")["data"]
    print_result(args, users, lambda us: table(
        ["USER", "ROLE", "KEYS", "LIMITS", "CREATED"],
        [[u["id"], u["role"], u["keys"], _limits_label(u.get("limits")), _when(u["created"])]
         for u in us]))
    return Exit.OK


def cmd_users_rm(args: argparse.Namespace) -> int:
    result = client_for(args).delete("/api/users/" + urllib.parse.quote(args.name, safe=""))
    print_result(args, result, lambda r: f"removed {r['deleted']} and its "
                 f"{r['keys_removed']} key(s)")
    return Exit.OK


# --- keys ---------------------------------------------------------------------------------

def cmd_keys_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.user:
        body["user"] = args.user
    if args.expires is not None:
        body["expires"] = args.expires
    if args.models:
        body["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if limits := _limits(args):
        body["limits"] = limits
    key = client_for(args).post("/api/keys", body)
    print_result(args, key, lambda k: (
        f"API key {k['id']} ({k['name']}) for {k['user']}, expires {_when(k['expires'])}:\n"
        f"  {k['key']}\n"
        "Shown once: gpumesh keeps only its hash."))
    return Exit.OK


def cmd_keys_ls(args: argparse.Namespace) -> int:
    keys = client_for(args).get("/api/keys")["data"]
    if args.user:
        keys = [k for k in keys if k["user"] == args.user]
    print_result(args, keys, lambda ks: table(
        ["ID", "NAME", "USER", "ROLE", "EXPIRES", "MODELS", "LIMITS"],
        [[k["id"], k["name"], k["user"], k["role"], _when(k["expires"]),
          ",".join(k["models"]) if k["models"] else "all", _limits_label(k["limits"])]
         for k in ks]))
    return Exit.OK


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    result = client_for(args).delete("/api/keys/" + urllib.parse.quote(args.id, safe=""))
    print_result(args, result, lambda r: f"revoked {r['revoked']}: every node refuses it now")
    return Exit.OK


def _limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpm", type=int, help="requests per minute")
    parser.add_argument("--tpm", type=int, help="tokens per minute (prompt + completion)")
    parser.add_argument("--concurrency", type=int, help="requests in flight at once")


def register(sub: Any) -> None:
    users_sub = add_group(sub, "users", "people and services that own API keys",
                          "add, ls or rm")
    add = add_client_command(users_sub, "add", cmd_users_add, "add a user")
    add.add_argument("name", metavar="NAME", help="the user's name (its id)")
    add.add_argument("--role", choices=["user", "admin"], default="user",
                     help="admin: manages the cluster; user: calls models (default)")
    _limit_flags(add)
    add_client_command(users_sub, "ls", cmd_users_ls, "list users")
    rm = add_client_command(users_sub, "rm", cmd_users_rm, "remove a user and its keys")
    rm.add_argument("name", metavar="NAME", help="the user's name")

    keys_sub = add_group(sub, "keys", "API keys: create (shown once), list, revoke",
                         "create, ls or revoke")
    create = add_client_command(keys_sub, "create", cmd_keys_create, "create a key")
    create.add_argument("--name", default="key", help="a label for people (default: key)")
    create.add_argument("--user", help="whose key (default: yours)")
    create.add_argument("--expires", type=parse_expiry, metavar="AGE_OR_DATE",
                        help="30d, 12h, 2w, 90m or YYYY-MM-DD (default: never)")
    create.add_argument("--models", help="the only models it may use, comma-separated")
    _limit_flags(create)
    ls = add_client_command(keys_sub, "ls", cmd_keys_ls, "list keys (never the keys themselves)")
    ls.add_argument("--user", help="only this user's keys")
    revoke = add_client_command(keys_sub, "revoke", cmd_keys_revoke, "revoke a key by its id")
    revoke.add_argument("id", metavar="ID", help="the key's id (from `gpumesh keys ls`)")
