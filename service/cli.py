"""``fashion-serve``: the service under gunicorn with its config, as ``make serve`` and the image run it.

    fashion-serve [GUNICORN_OPTIONS...]

is ``gunicorn -c <service>/gunicorn.conf.py [GUNICORN_OPTIONS...] "service:create_app()"``; every
setting comes from the environment (the README's table), which the config validates (exit 2 with one
line on a bad value). The process becomes gunicorn (exec), so signals reach its master directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

GUNICORN_CONF = Path(__file__).resolve().with_name("gunicorn.conf.py")
APP = "service:create_app()"


def command(extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), *extra, APP]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    argv = command(args)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
