"""Command line: ``check-aliases [PATH]``, ``check-keys [PATH]``, ``hash-key``, ``check-config``.

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

from app.callers import KeysConfigError, hash_key, load_keys
from app.config import ConfigError, build_config, from_env, read_env
from app.prices import PricesConfigError, load_prices
from app.routing.aliases import AliasConfigError, load_aliases

DOTENV = ".env"


def check_file(path, load, error, summary):
    """Return the exit status of checking one operator file, like ``nginx -t``."""
    try:
        table = load(path)
    except error as exc:
        print(f"mana-llm: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: ok, {summary(table)}")
    return 0


def check_aliases(path):
    """Return the exit status of checking one alias file."""
    return check_file(path, load_aliases, AliasConfigError,
                      lambda t: f"{len(t.aliases)} aliases, default {t.default}")


def check_keys(path):
    """Return the exit status of checking one key file."""
    return check_file(path, load_keys, KeysConfigError, lambda t: f"{len(t.callers)} callers")


def print_hash_key(stream):
    """Print the key file line for the key on ``stream``'s first line."""
    key = stream.readline().rstrip("\r\n")
    if not key:
        print("mana-llm: no key on stdin", file=sys.stderr)
        return 1
    print(f'keys: ["{hash_key(key)}"]')
    return 0


def check_config(as_json):
    """Return the exit status of checking the configuration and its alias, key and price files."""
    try:
        raw = read_env(dotenv_path=DOTENV)
        config = build_config(raw)
        table = load_aliases(config["ALIASES_PATH"])
        callers = load_keys(config["KEYS_PATH"]) if config["KEYS_PATH"] else None
        prices = load_prices(config["PRICES_PATH"])
        admin = config["ADMIN_KEY_NAME"]
        if admin and callers and admin not in callers.callers:
            raise ConfigError(f"ADMIN_KEY_NAME {admin!r} names no caller of KEYS_PATH")
    except (AliasConfigError, ConfigError, KeysConfigError, PricesConfigError) as exc:
        print(f"mana-llm: {exc}", file=sys.stderr)
        return 1
    entries = [e.label for a in table.aliases.values() for e in a.chain]
    for label in prices.unpriced(entries):
        # stderr: the master logs it, and --json's stdout stays one document.
        print(f"mana-llm: warning: no price for {label} (counted as 0); add it or a "
              "default for its provider to the price file", file=sys.stderr)
    if as_json:
        print(json.dumps({"env": raw, "aliases": table.to_doc(), "prices": prices.to_doc(),
                          "callers": callers.to_doc() if callers else None}))
    else:
        print(f"configuration ok; {config['ALIASES_PATH']}: {len(table.aliases)} aliases"
              + (f"; {config['KEYS_PATH']}: {len(callers.callers)} callers" if callers else ""))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m app")
    commands = parser.add_subparsers(dest="command", required=True)
    aliases = commands.add_parser("check-aliases", help="validate an alias file")
    aliases.add_argument("path", nargs="?", help="alias file (default: ALIASES_PATH)")
    config = commands.add_parser("check-config", help="validate the configuration")
    config.add_argument("--json", action="store_true", help="print what was accepted")
    keys = commands.add_parser("check-keys", help="validate a key file")
    keys.add_argument("path", nargs="?", help="key file (default: KEYS_PATH)")
    commands.add_parser("hash-key", help="read a key on stdin, print its key file line")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.json)
    if args.command == "hash-key":
        return print_hash_key(sys.stdin)
    variable = "ALIASES_PATH" if args.command == "check-aliases" else "KEYS_PATH"
    if args.path is None:
        try:
            args.path = from_env(dotenv_path=DOTENV)[variable]
        except ConfigError as exc:
            print(f"mana-llm: {exc}", file=sys.stderr)
            return 1
        if not args.path:
            print(f"mana-llm: no path given and {variable} is not set", file=sys.stderr)
            return 1
    return check_aliases(args.path) if args.command == "check-aliases" else check_keys(args.path)


if __name__ == "__main__":
    sys.exit(main())
