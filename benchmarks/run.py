"""`make bench`: the speed comparison against the reference stack, then the method matrix.

Both take a while on a 2-core CPU (speed: ~10 min; methods on the quickstart recipe: ~1.5 h).
Run the pieces alone, with their options, as `python -m benchmarks.speed` / `python -m benchmarks.methods`.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import methods, speed


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)  # takes no options: `--help` explains, anything else is refused before a long run starts
    program = sys.argv[0]
    sys.argv = [program]  # each piece with its defaults
    speed.main()
    methods.main()


if __name__ == "__main__":
    main()
