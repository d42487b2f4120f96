"""distadam <command> (also ``python -m distadam <command>``).

Commands:
    launch  run a training script as N local worker processes
            (``distadam launch --help``; the same as ``distadam-launch``)
    plan    per-worker memory and communication of Adam vs ShardedAdam
            (``distadam plan --help`` and distadam/planner.py)

Neither command imports TensorFlow, except ``plan --model`` for an ``.h5``
file (a ``.keras`` file is read without it).
"""

from __future__ import annotations

import argparse
import sys

PROG = "distadam"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    # The launcher owns its whole command line (everything after the script
    # belongs to the script), so it is parsed by distadam.launch itself.
    commands.add_parser("launch", add_help=False, help="run a script as N local worker processes")
    if argv[:1] == ["launch"]:
        from distadam import launch

        return launch.main(argv[1:], prog=f"{PROG} launch")

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
