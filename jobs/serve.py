"""The serve job: an OpenAI-compatible server for a run's adapters until it is stopped or its time
is up (slurmtune.serve). Its folder is the run's ``serve/``; ``request.json`` there says what to serve."""

from __future__ import annotations

from pathlib import Path

from slurmtune.cluster.slurm import current_job_id
from slurmtune.logs import quiet_output


class ServeJob:
    kind = "serve"

    def __init__(self, serve_dir: str | Path):
        self.serve_dir = str(Path(serve_dir).resolve())

    def __call__(self) -> int:
        import os

        from slurmtune.serve.engine import run_server

        # The job the scheduler knows: SLURM's, or the local executor's controlling process.
        job_id = current_job_id() or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or str(os.getpid())
        serve_dir = Path(self.serve_dir)
        with quiet_output(str(serve_dir.parent), "serve"):
            return run_server(serve_dir, job_id, log=lambda line: print(line, flush=True))
