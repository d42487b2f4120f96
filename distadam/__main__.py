"""``python -m distadam <command>``.

Commands:
    plan    per-worker memory and communication of Adam vs ShardedAdam
            (see ``python -m distadam plan --help`` and distadam/planner.py)
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distadam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    from distadam import planner

    plan = commands.add_parser(
        "plan", help="memory/communication planner",
        description=planner.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    planner.add_arguments(plan)
    plan.set_defaults(run=planner.run)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
