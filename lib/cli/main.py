"""The ``slurmtune`` command line: one parser, one module per command group.

::

    slurmtune convert FORMAT FILES --out DIR       slurmtune validate FILES      (cli/data.py)
    slurmtune run MANIFEST [--cluster NAME]        slurmtune sweep MANIFEST     (cli/run.py)
    slurmtune status [RUN]   slurmtune logs RUN    slurmtune cancel RUN         (cli/status.py)
    slurmtune predict / score / compare / merge / report                       (cli/evaluate.py)
    slurmtune make-tiny-model / fetch-model                                     (cli/models.py)
    slurmtune doctor [--cluster NAME]                                           (cli/doctor.py)

Exit status: 0 success, 1 invalid input or a failed step, 2 usage error. Errors the
user can fix are printed as one line (or one list), never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys

from slurmtune import __version__
from slurmtune.cli import data, doctor, evaluate, models, run, status
from slurmtune.errors import SlurmtuneError

# key.sub=value anywhere after the command (argparse cannot take positionals after options).
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
TAKES_OVERRIDES = ("config", "run", "submit", "sweep")
GROUPS = (data, models, evaluate, run, status, doctor)  # the order of `slurmtune --help`

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = []
    if argv and argv[0] in TAKES_OVERRIDES:
        overrides = [a for a in argv[1:] if OVERRIDE.match(a)]
        argv = [argv[0]] + [a for a in argv[1:] if not OVERRIDE.match(a)]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if overrides:
        name = "rest" if argv[0] == "sweep" else "overrides"
        setattr(args, name, [*getattr(args, name), *overrides])
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slurmtune", description="LoRA/QLoRA fine-tuning of language "
                                     "models on course data, as SLURM batch jobs")
    parser.add_argument("--version", action="version", version=f"slurmtune {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(sub, argv)
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
