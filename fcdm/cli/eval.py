"""`fcdm-eval`: `python -m fcdm.eval` as an installed command. fcdm.eval's main returns the metrics (for callers in
Python); a console command's return value is its exit status, so this one returns 0 once the JSON is printed."""
import sys

from fcdm.eval.__main__ import main as evaluate


def main(argv=None) -> int:
    evaluate(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
