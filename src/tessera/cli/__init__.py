"""The `tessera` command: one sub-command per workflow stage, and tools around them.

Stages (each is also a rule, ``rules/<stage>.smk``, and a module, ``tessera.<stage>``): ``fetch``,
``infer``, ``assemble``, ``publish``, and ``demo`` (its scenes and checkpoints). Tools: ``plan``,
``search``, ``verify``, ``embed-patch``, ``export-patches``, ``install-profile``. Snakemake rules
call the stages with explicit arguments; mistakes a user can fix end in one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tessera import __version__
from tessera.cli import stages, tools
from tessera.errors import EXIT_SOURCE_UNAVAILABLE, DamagedIntermediate, SourceUnavailable, UserError
from tessera.io import remove_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tessera-workflow {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (*stages.PARSERS, *tools.PARSERS):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        status = args.func(args)
    except DamagedIntermediate as exc:
        remove_path(exc.path)
        print(f"tessera: error: {exc}: removed it; run the workflow again to rebuild it", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"tessera: error: {exc}", file=sys.stderr)
        return 2
    except SourceUnavailable as exc:
        # Before OSError: requests' errors are OSErrors, and an outage is not a full disk.
        print(f"tessera: error: {exc}: the source was unavailable; nothing partial was kept and rerunning "
              "continues (Snakemake: --retries)", file=sys.stderr)
        return EXIT_SOURCE_UNAVAILABLE
    except KeyboardInterrupt:
        print("tessera: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # A full disk, an exceeded quota, a permission: the job fails with one line, the previous
        # outputs stay as they were (every write is atomic).
        print(f"tessera: error: {exc}: check free space, quota and permissions, then rerun", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
