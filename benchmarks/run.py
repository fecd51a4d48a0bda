"""`make bench`: the speed comparison against the reference stack, then the method matrix.

Both take a while on a 2-core CPU (speed: ~10 min; methods on the quickstart recipe: ~1 h).
Run the pieces alone with `python -m benchmarks.speed` / `python -m benchmarks.methods`.
"""

from __future__ import annotations

import sys

from benchmarks import methods, speed


def main() -> None:
    argv = sys.argv
    sys.argv = [argv[0]]
    speed.main()
    methods.main()


if __name__ == "__main__":
    main()
