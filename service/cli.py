"""Service-room subcommands. Imports only argparse at module level."""
from __future__ import annotations


def register(sub) -> None:
    pass
