"""Merge the eval shards in input order, score them, and write the run's reports."""

from __future__ import annotations

from pathlib import Path

from slurmtune.config import RunConfig
from slurmtune.errors import SlurmtuneError

from slurmtune.jobs.base import Job
from slurmtune.jobs.eval import shard_file


class ReportJob(Job):
    kind = "report"

    def run(self, cfg: RunConfig) -> dict:
        from slurmtune.evaluate.generate import merge_shards
        from slurmtune.evaluate.metrics import score_file
        from slurmtune.evaluate.report import write_reports
        run_dir = Path(self.run_dir)
        shards = [shard_file(run_dir, i, cfg.eval.shards) for i in range(cfg.eval.shards)]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise SlurmtuneError(f"{len(missing)} eval shard(s) missing, first {missing[0]}; "
                                 "rerun them with: slurmtune submit eval " + str(run_dir))
        predictions = run_dir / "predictions.jsonl"
        merge_shards(shards, predictions)
        metrics = score_file(predictions, errors_file=run_dir / "errors.jsonl", normalize=cfg.eval.normalize)
        paths = write_reports(run_dir, predictions, metrics)
        print(f"report: {paths.get('html', run_dir / 'report.html')}", flush=True)
        return {name: str(p) for name, p in paths.items()}
