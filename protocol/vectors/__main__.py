"""``python -m protocol.vectors``: regenerate frames.json (``--check``: exit 1 when it is out of date)."""

from __future__ import annotations

import argparse
import sys

from protocol.vectors import PATH, render


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m protocol.vectors",
                                     description=f"Write the protocol's test vectors to {PATH} from their "
                                                 "generator (protocol/vectors/__init__.py).")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = PATH.read_text(encoding="utf-8") if PATH.exists() else ""
        if current != text:
            print(f"{PATH} is out of date: run python -m protocol.vectors", file=sys.stderr)
            return 1
        return 0
    PATH.write_text(text, encoding="utf-8")
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
