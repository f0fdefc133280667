import sys

from slurmtune.cli.main import main

sys.exit(main())
