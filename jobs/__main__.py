import sys

from slurmtune.jobs.cli import main

sys.exit(main())
