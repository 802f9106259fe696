"""Run `transformers serve` for one model, under the name clients call it by, behind a key.

    <venv>/bin/python -I transformers_runner.py --model-path DIR --served-name NAME \\
        -- --host 127.0.0.1 --port 8081 --device cpu [more `transformers serve` options]

Everything after `--` goes to transformers' own `serve` command (its parser, defaults and
errors), with NAME as the model it is pinned to. The runner adds two things the server
lacks:

- **The served name.** A server pinned to one model answers only requests whose `model`
  is exactly the name it was pinned with, and puts that name in its answers; a local path
  is kept as given. So the runner makes a private directory in which NAME is a symlink to
  DIR, works from there, and pins the server to NAME: clients send the deployment's name,
  not a path on this node. The directory goes when the runner ends; one left by a runner
  killed outright is removed by the next runner that starts.
- **The engine key.** `transformers serve` has no API-key option. The runner wraps the
  ASGI app uvicorn loads (`uvicorn.Config.load`, the one place every app passes through,
  whichever way the server builds it) in a check of `Authorization: Bearer KEY`, the key
  read from GPUMESH_ENGINE_KEY and removed from the environment first. `/health` stays
  open: it says nothing but "loaded", and the node's probes read it.

It imports nothing of gpumesh: the engine version's own interpreter runs it as a file, in
isolated mode. It also skips the `transformers` console script's update check (a request
to PyPI at every start). Dying with the daemon is the process guard's job (it kills the
whole process group), as for every engine.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["main", "serve_arguments", "remove_stale_workdirs", "BearerKey", "KEY_ENV",
           "OPEN_PATHS"]

KEY_ENV = "GPUMESH_ENGINE_KEY"
OPEN_PATHS = frozenset({"/health"})
WORKDIR_PREFIX = "gpumesh-transformers-"        # then the runner's pid
_PREFIX = "transformers runner:"


def main(argv: list[str] | None = None) -> int:
    args, serve_options = _split(sys.argv[1:] if argv is None else argv)
    problem = _name_problem(args.served_name)
    if problem:
        print(f"{_PREFIX} error: served name {args.served_name!r} {problem}", file=sys.stderr)
        return 2
    if not Path(args.model_path).is_dir():
        print(f"{_PREFIX} error: model directory not found: {args.model_path}", file=sys.stderr)
        return 2
    key = os.environ.pop(KEY_ENV, None)
    # uvicorn re-raises the stop signal after its graceful shutdown; SystemExit then runs
    # the cleanup below (before uvicorn runs, the default action would skip it).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    remove_stale_workdirs(Path(tempfile.gettempdir()))
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
    try:
        link = workdir / args.served_name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(args.model_path).resolve(), target_is_directory=True)
        os.chdir(workdir)
        if key:
            _require_key(key)
        print(f"{_PREFIX} serving {args.model_path} as {args.served_name!r} "
              f"(engine key {'checked' if key else 'not set'}, pid {os.getpid()})", flush=True)
        return _serve(args.served_name, serve_options)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def remove_stale_workdirs(parent: Path) -> None:
    """Remove the private directories of runners that are gone: a runner killed outright
    (kill -9 of the daemon takes its whole process group) leaves its own behind."""
    for directory in parent.glob(f"{WORKDIR_PREFIX}*-*"):
        pid = directory.name[len(WORKDIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and directory.is_dir() and not directory.is_symlink() \
                and directory.stat().st_uid == os.getuid() and not _alive(int(pid)):
            shutil.rmtree(directory, ignore_errors=True)   # a symlink inside: not followed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _split(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    cut = argv.index("--") if "--" in argv else len(argv)
    ours, theirs = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="transformers_runner.py")
    parser.add_argument("--model-path", required=True, help="the model's directory")
    parser.add_argument("--served-name", required=True, help="the name clients send as `model`")
    return parser.parse_args(ours), theirs


def _name_problem(name: str) -> str | None:
    """Why `name` cannot be a relative path inside the private directory, or None."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return "is not a plain relative path (empty, '.' or '..' parts)"
    if ":" in parts[-1] and parts[-1].endswith(".gguf"):
        return "ends in ':<file>.gguf', which transformers reads as a GGUF file to load"
    if "@" in name:
        return "contains '@', which transformers reads as a revision"
    return None


def _serve(served_name: str, options: list[str]) -> int:
    """transformers' `serve` command pinned to `served_name`, through its own parser."""
    import click
    try:
        from transformers.cli.transformers import app
    except ImportError as exc:
        print(f"{_PREFIX} error: this transformers has no `transformers serve` command of "
              f"version 5 or later ({exc})", file=sys.stderr)
        return 2
    group = app if isinstance(app, click.Group) else _typer_command(app)
    serve = group.commands["serve"]
    try:
        serve.main(serve_arguments(serve, served_name, options),
                   prog_name="transformers serve", standalone_mode=False)
    except click.ClickException as exc:
        # One plain line (not the framed help box): it is what the node shows as the reason.
        print(f"transformers serve: error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except click.Abort:
        return 130
    return 0


def serve_arguments(serve: Any, served_name: str, options: list[str]) -> list[str]:
    """The serve command's arguments: the pinned model is its positional argument from
    transformers 5.5 on, the `--force-model` option before."""
    import click
    pinned = next((p for p in serve.params if p.name == "force_model"), None)
    if isinstance(pinned, click.Option):
        return ["--force-model", served_name, *options]
    return [served_name, *options]


def _typer_command(app: Any) -> Any:
    import typer.main
    return typer.main.get_command(app)


def _require_key(key: str) -> None:
    """Every app uvicorn serves from now on answers 401 without `Bearer <key>`."""
    import uvicorn.config

    load = uvicorn.config.Config.load

    def load_with_key(config: Any) -> None:
        load(config)
        if not isinstance(config.loaded_app, BearerKey):
            config.loaded_app = BearerKey(config.loaded_app, key)

    uvicorn.config.Config.load = load_with_key


class BearerKey:
    """ASGI middleware: HTTP requests need `Authorization: Bearer <key>`, except OPEN_PATHS."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self._expected = f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in OPEN_PATHS \
                or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": {"message": "missing or wrong engine key",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                return hmac.compare_digest(value, self._expected)
        return False


if __name__ == "__main__":
    sys.exit(main())
