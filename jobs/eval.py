"""One shard of the eval set: batched greedy generation from the base model + the run's adapter.

Submitted as an array (one task per shard, ``eval.array_parallelism`` at a time).
A shard whose predictions file is complete returns at once, so a requeued or
re-run array redoes only unfinished shards.
"""

from __future__ import annotations

from pathlib import Path

from slurmtune.config import RunConfig
from slurmtune.data.vision import VisionSettings
from slurmtune.runs.folder import eval_file

from slurmtune.jobs.base import Job


def shard_file(run_dir: str | Path, index: int, count: int) -> Path:
    return Path(run_dir) / "eval" / f"predictions.shard-{index:04d}-of-{count:04d}.jsonl"


class EvalJob(Job):
    kind = "eval"

    def run(self, cfg: RunConfig, shard: int = 0) -> str:
        from slurmtune.evaluate.generate import predict_file
        from slurmtune.serve.server import endpoint_client
        out = shard_file(self.run_dir, shard, cfg.eval.shards)
        e = cfg.eval
        client = endpoint_client(e.endpoint, e.endpoint_model, e.endpoint_concurrency) if e.endpoint else None
        v = cfg.vision
        predict_file(cfg.model.path, eval_file(cfg, self.run_dir), out, adapter=str(Path(self.run_dir) / "final"),
                     shard=(shard, e.shards), batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                     client=client, vision=VisionSettings(v.fps, v.max_frames, v.max_pixels),
                     cache_dir=Path(self.run_dir) / "frames")  # the frames training decoded
        return str(out)
