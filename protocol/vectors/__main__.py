"""``python -m protocol.vectors``: regenerate frames.json (``--check``: exit 1 when it is out of date)."""

from __future__ import annotations

import sys

from protocol.vectors import PATH, render


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
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
