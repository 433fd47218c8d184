"""The one way every tool (and the launcher) turns a UserError into a one-line message and exit 2."""
import sys

from megatron_ext.errors import UserError


def run_main(main, argv=None) -> None:
    """Call `main(argv)`; a UserError prints `error: <message>` on stderr and exits 2."""
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
