"""Service-room subcommands: ``photoz serve``. Imports only argparse at module level."""
from __future__ import annotations

import argparse


def _serve(args) -> int:
    from service.server import serve
    from service.settings import Settings

    overrides = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    if args.api_keys is not None:
        overrides["api_keys"] = [k for k in args.api_keys.split(",") if k]
    return serve(Settings.from_env(**overrides))


def register(sub: argparse._SubParsersAction) -> None:
    from service.settings import Settings

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
