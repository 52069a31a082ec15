"""Service-room subcommands: ``photoz serve``. Imports only argparse at module level."""
from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from photoz.service.server import serve
    from photoz.service.settings import Settings, parse_api_keys

    overrides = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    if args.api_keys is not None:
        overrides["api_keys"] = parse_api_keys(args.api_keys)
        if not overrides["api_keys"]:  # e.g. a wrapper passing an unset variable: never silently open the door
            print("photoz serve: --api-keys was given but holds no key; give keys, or leave the flag out to "
                  "serve without authentication", file=sys.stderr)
            return 2
    try:
        settings = Settings.from_env(**overrides)
    except ValidationError as exc:  # which setting, what it must be, what it got: no traceback
        for error in exc.errors():
            if error["loc"]:
                where = ".".join(str(x) for x in error["loc"])
                print(f"photoz serve: {where}: {error['msg']} (got {error['input']!r:.80})", file=sys.stderr)
            else:  # a rule across settings: its input is every setting, API keys included; not printed
                print(f"photoz serve: {error['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    return serve(settings)


def _missing_serving_packages(reason: str) -> int:
    print(f"photoz serve needs the serving packages ({reason}): pip install photoz", file=sys.stderr)
    return 2


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    try:
        from photoz.service.settings import Settings
    except ImportError as exc:  # a training-only environment without the serving packages
        missing = str(exc)
        p = sub.add_parser("serve", help="serve a model bundle over HTTP (needs the serving packages)")
        p.set_defaults(func=lambda _args: _missing_serving_packages(missing))
        return
    p = sub.add_parser("serve", help="serve a model bundle over HTTP",
                       description="Serve a bundle with dynamic batching. Every flag also reads from the "
                                   "environment variable PHOTOZ_<NAME> (e.g. PHOTOZ_MAX_BATCH_SIZE); flags win.")
    for name, info in Settings.model_fields.items():
        if name == "api_keys":
            p.add_argument("--api-keys", default=None, help="comma-separated bearer tokens (env PHOTOZ_API_KEYS)")
            continue
        flag = "--" + name.replace("_", "-")
        if info.annotation is bool:
            p.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction,
                           help=f"{info.description} (default {info.default})")
        else:
            p.add_argument(flag, dest=name, default=None, help=f"{info.description or name} (default {info.default})")
    p.set_defaults(func=_serve)
