"""The ``slurmtune`` command line: one parser, one module per command group.

::

    slurmtune convert FORMAT FILES --out DIR       slurmtune validate FILES      (cli/data.py)
    slurmtune review FILES --out PAGE.html                                     (cli/data.py)
    slurmtune run MANIFEST [--cluster NAME]        slurmtune sweep MANIFEST     (cli/run.py)
    slurmtune status [RUN]   slurmtune logs RUN    slurmtune cancel RUN         (cli/status.py)
    slurmtune predict / score / compare / merge / report                       (cli/evaluate.py)
    slurmtune make-tiny-model / fetch-model / publish                           (cli/models.py)
    slurmtune serve RUN|ADAPTER ...   slurmtune serve status|stop RUN             (cli/serve.py)
    slurmtune doctor [--cluster NAME]                                           (cli/doctor.py)

Exit status: 0 success, 1 invalid input or a failed step, 2 usage error. Errors the
user can fix are printed as one line (or one list), never a traceback. What other libraries
say goes to a debug log (slurmtune.logs); ``slurmtune --verbose COMMAND`` shows it, in the
jobs the command starts too.
"""

from __future__ import annotations

import argparse
import re
import sys

from slurmtune import __version__
from slurmtune.cli import data, doctor, evaluate, models, run, serve, status
from slurmtune.errors import SlurmtuneError
from slurmtune.logs import quiet_output, verbose_requested

# key.sub=value anywhere after the command (argparse cannot take positionals after options).
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
TAKES_OVERRIDES = ("config", "run", "submit", "sweep")
GROUPS = (data, models, evaluate, run, serve, status, doctor)  # the order of `slurmtune --help`

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = []
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))  # after --verbose
    if at < len(argv) and argv[at] in TAKES_OVERRIDES:
        overrides = [a for a in argv[at + 1:] if OVERRIDE.match(a)]
        argv = argv[:at + 1] + [a for a in argv[at + 1:] if not OVERRIDE.match(a)]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if overrides:
        name = "rest" if argv[at] == "sweep" else "overrides"
        setattr(args, name, [*getattr(args, name), *overrides])
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with quiet_output(verbose=args.verbose or verbose_requested()):
        return run_command(args)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slurmtune", description="LoRA/QLoRA fine-tuning of language "
                                     "models on course data, as SLURM batch jobs")
    parser.add_argument("--version", action="version", version=f"slurmtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="also show what other libraries log and warn (always kept in the run's debug.log)")
    sub = parser.add_subparsers(metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(sub, argv)
    for command in {id(p): p for p in sub.choices.values()}.values():  # `slurmtune run M --verbose` too
        # SUPPRESS: a command's default must not undo `slurmtune --verbose COMMAND`.
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help=argparse.SUPPRESS)
    return parser


def run_command(args) -> int:
    """Run a parsed command; user-fixable errors become one line and an exit status."""
    try:
        return args.func(args) or 0
    except SlurmtuneError as e:
        print(f"slurmtune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("slurmtune: interrupted", file=sys.stderr)
        return 130
