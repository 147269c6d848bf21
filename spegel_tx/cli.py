"""``spegel-tx``: one-shot commands beside the twistd daemon."""

from __future__ import annotations

import argparse
import sys

from spegel_tx import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spegel-tx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("version", help="print the version and exit")
    args = parser.parse_args(argv)
    if args.command == "version":
        print(f"spegel-tx {__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
