"""Command line: ``python -m app check-aliases [PATH]`` and ``check-config``.

``check-aliases`` validates an alias file the way the gateway will (like
``nginx -t``) and exits non-zero with the reason, so an operator can
check before ``kill -HUP``. ``check-config`` validates the whole
configuration (environment, ``.env`` and the alias file it names);
gunicorn's master runs it with ``--json`` on start and on every HUP and
hands what it printed to the workers, so a worker never reads a file or
variable the master has not accepted.
"""

import argparse
import json
import sys

from app.config import ConfigError, build_config, from_env, read_env
from app.routing.aliases import AliasConfigError, load_aliases

DOTENV = ".env"


def check_aliases(path):
    """Return the exit status of checking one alias file."""
    try:
        table = load_aliases(path)
    except AliasConfigError as exc:
        print(f"mana-llm: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: ok, {len(table.aliases)} aliases, default {table.default}")
    return 0


def check_config(as_json):
    """Return the exit status of checking the configuration and its alias file."""
    try:
        raw = read_env(dotenv_path=DOTENV)
        config = build_config(raw)
        table = load_aliases(config["ALIASES_PATH"])
    except (AliasConfigError, ConfigError) as exc:
        print(f"mana-llm: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"env": raw, "aliases": table.to_doc()}))
    else:
        print(f"configuration ok; {config['ALIASES_PATH']}: {len(table.aliases)} aliases")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m app")
    commands = parser.add_subparsers(dest="command", required=True)
    aliases = commands.add_parser("check-aliases", help="validate an alias file")
    aliases.add_argument("path", nargs="?", help="alias file (default: ALIASES_PATH)")
    config = commands.add_parser("check-config", help="validate the configuration")
    config.add_argument("--json", action="store_true", help="print what was accepted")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.json)
    if args.path is None:
        try:
            args.path = from_env(dotenv_path=DOTENV)["ALIASES_PATH"]
        except ConfigError as exc:
            print(f"mana-llm: {exc}", file=sys.stderr)
            return 1
    return check_aliases(args.path)


if __name__ == "__main__":
    sys.exit(main())
