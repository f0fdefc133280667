"""Check every row the run will train and evaluate on; fail the run here, not hours later."""

from __future__ import annotations

from pathlib import Path

from slurmtune.config import RunConfig
from slurmtune.errors import DataError
from slurmtune.data.jsonio import write_json_atomic
from slurmtune.runs.folder import data_files, eval_file
from slurmtune.data.validate import print_report, validate_files

from slurmtune.jobs.base import Job


class ValidateJob(Job):
    kind = "validate"

    def run(self, cfg: RunConfig) -> dict:
        train, validation = data_files(cfg, self.run_dir)
        files = [*train, *([validation] if validation else [])]
        extra = eval_file(cfg, self.run_dir)
        if extra and extra not in files:
            files.append(extra)
        report = validate_files(files, check_paths=True)
        write_json_atomic(Path(self.run_dir) / "data" / "validation_report.json", report)
        print_report(report)
        if report["problems"]:
            first = report["problems"][0]
            raise DataError(first["file"], first["line"], f"{first['message']} "
                            f"({len(report['problems'])} problem(s); see data/validation_report.json)",
                            field=first["field"])
        return {"rows": report["rows"]}
