"""Reading the operator's YAML files (aliases, keys, prices): every failure one error."""

import yaml

# Besides YAMLError, PyYAML's constructors raise these for values such as a
# date of month 13, a malformed !!timestamp, or nesting thousands deep.
_CONSTRUCTOR_ERRORS = (ValueError, TypeError, AttributeError, IndexError, RecursionError)


def read_yaml(path, error):
    """Return the parsed document at ``path``; raise ``error(message)`` for any failure."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path} is not valid YAML: {exc}") from None
    except _CONSTRUCTOR_ERRORS as exc:
        raise error(f"{path} is not valid YAML: {type(exc).__name__}: {exc}") from None
