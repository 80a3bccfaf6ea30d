"""`python -m awqpad` and the `awqpad` console script.

The CLI's imports (typer, rich, numpy) take a moment; a Ctrl-C in that moment would otherwise print
an import traceback, so the import happens here, inside the same "interrupted" handling as the run."""

import sys


def run() -> None:
    try:
        from awqpad.cli import main
    except KeyboardInterrupt:
        print("awqpad: interrupted", file=sys.stderr)
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
