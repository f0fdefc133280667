"""Convert the manifest's raw ``data.inputs`` into canonical records in ``<run>/data/``."""

from __future__ import annotations

from pathlib import Path

from slurmtune.config import RunConfig
from slurmtune.data.converters import get_converter, run_conversion

from slurmtune.jobs.base import Job


class ConvertJob(Job):
    kind = "convert"

    def run(self, cfg: RunConfig) -> dict:
        converter = get_converter(cfg.data.format)(**cfg.data.options)
        summary = run_conversion(converter, cfg.data.inputs, Path(self.run_dir) / "data",
                                 split=cfg.data.split, seed=cfg.data.seed, on_error=cfg.data.on_error)
        print(f"{cfg.data.format}: {summary.line()}", flush=True)
        return {"written": summary.written}
