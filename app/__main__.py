"""Command line: ``python -m app check-aliases [PATH] [--json]``.

Validates an alias file the way the gateway will (like ``nginx -t``) and
exits non-zero with the reason, so an operator can check before
``kill -HUP``. Without PATH it checks the configured ``ALIASES_PATH``,
and the rest of the configuration too. gunicorn's master runs this
(with ``--json``) to accept a file without importing the app itself.
"""

import argparse
import json
import sys

from app.config import ConfigError, from_env
from app.routing.aliases import AliasConfigError, load_aliases


def check_aliases(path, as_json):
    """Return the exit status of checking ``path`` (or the configured file)."""
    try:
        if path is None:
            path = from_env(dotenv_path=".env")["ALIASES_PATH"]
        table = load_aliases(path)
    except (AliasConfigError, ConfigError) as exc:
        print(f"mana-llm: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(table.to_doc()))
    else:
        print(f"{path}: ok, {len(table.aliases)} aliases, default {table.default}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m app")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-aliases", help="validate an alias file")
    check.add_argument("path", nargs="?", help="alias file (default: ALIASES_PATH)")
    check.add_argument("--json", action="store_true", help="print the accepted table")
    args = parser.parse_args(argv)
    return check_aliases(args.path, args.json)


if __name__ == "__main__":
    sys.exit(main())
