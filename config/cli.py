"""One flag style for every command line of the project: `--words-with-hyphens`.

The same flag written with underscores (`--model_dir`, as the Cerebras Model Zoo and older
versions of this project spell it) is accepted and read as the hyphenated one, so both
spellings work everywhere and `--help` shows one.
"""
from __future__ import annotations

import argparse
import sys

ALIAS_NOTE = "Flags are written with hyphens; the same flag with underscores works too (--model_dir)."


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, epilog: str | None = None, **kwargs):
        super().__init__(*args, epilog=f"{epilog}\n\n{ALIAS_NOTE}" if epilog else ALIAS_NOTE, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._hyphenated(args), namespace)

    def _hyphenated(self, args: list[str]) -> list[str]:
        """Rewrite `--a_b` and `--a_b=value` as `--a-b...` where that is one of this parser's options.
        Left as they are: arguments after `--`, ones that name no option, and ones holding a space
        (argparse reads those as values, e.g. a prompt)."""
        out = []
        for position, arg in enumerate(args):
            if arg == "--":
                return out + args[position:]
            if arg.startswith("--") and "_" in arg and " " not in arg:
                name, equals, value = arg.partition("=")
                spelled = name.replace("_", "-")
                if spelled in self._option_string_actions:
                    arg = spelled + equals + value
            out.append(arg)
        return out


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value
