"""``lineage.json`` beside an adapter: what it was trained on, with what, by which code.

::

    write_lineage(run_dir / "final", cfg, ["data/train.jsonl"], conversion_summary=summary,
                  sbatch_script=script_text, seeds={"seed": 42, "data_seed": 42},
                  started_at="2026-11-22T04:37:19+0000")
    # -> run_dir/final/lineage.json

It holds, per data file, the path, sha256 and row count; the conversion counts;
the resolved config; the code revision (git commit of the slurmtune source tree
and whether it had uncommitted changes, else the package version); the versions
of the training stack; the sbatch script; seeds; python version; host; start and
end time.

It never holds environment variables. Secrets can still hide in the sbatch
script (``export HF_TOKEN=...`` in a setup line), so assignments to
secret-looking names are redacted, and so is the value of any secret-looking
variable of this process wherever it appears.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import time
from pathlib import Path

from slurmtune.data.jsonio import write_json_atomic

PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes",
            "deepspeed", "submitit")
CONVERSION_COUNTS = ("format", "read", "written", "excluded_consent", "excluded_demo", "rejected", "skipped")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_?KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)
_VALUE = r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s;&|]+)"
# NAME=VALUE (shell, env files) and --flag VALUE / --flag=VALUE (command lines).
_ASSIGNMENTS = (re.compile(r"(?P<name>\b[A-Za-z_][A-Za-z0-9_]*)(?P<sep>=)" + _VALUE),
                re.compile(r"(?P<name>--?[A-Za-z][A-Za-z0-9_-]*)(?P<sep>=|\s+)" + _VALUE))
REDACTED = "<redacted>"


def write_lineage(adapter_dir: str | Path, cfg, data_files: list[str], conversion_summary: dict | None,
                  sbatch_script: str | None, seeds: dict, started_at: str | None = None,
                  memory: dict | None = None, media: list[str] = ()) -> Path:
    """``media``: the image and video files the rows name (a vision run), each hashed too."""
    from slurmtune.data.dataset import count_rows, file_sha256

    config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    lineage = {
        "data_files": [{"path": str(Path(p).resolve()), "sha256": file_sha256(p), "rows": count_rows(p)}
                       for p in data_files],
        **({"media_files": [{"path": str(Path(m).resolve()), "sha256": file_sha256(m)} for m in sorted(set(media))]}
           if media else {}),
        "conversion": _conversion_counts(conversion_summary),
        "config": config,
        "code": code_revision(),
        "packages": package_versions(),
        "sbatch_script": redact(sbatch_script) if sbatch_script is not None else None,
        "seeds": dict(seeds),
        "memory": memory,  # the estimate and, on a GPU, the peak this attempt allocated
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
        "started_at": started_at,
        "ended_at": now(),
    }
    path = Path(adapter_dir) / "lineage.json"
    write_json_atomic(path, _scrub(lineage))
    return path


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _conversion_counts(summary: dict | None) -> dict | None:
    if summary is None:
        return None
    if dataclasses.is_dataclass(summary):
        summary = dataclasses.asdict(summary)
    return {key: summary[key] for key in CONVERSION_COUNTS if key in summary}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_revision() -> dict:
    """git commit (+ dirty flag) of the tree slurmtune is imported from, else its version."""
    import slurmtune

    source = Path(slurmtune.__file__).resolve().parent
    commit = _git(source, "rev-parse", "HEAD")
    if commit:
        status = _git(source, "status", "--porcelain", "--untracked-files=no")
        return {"git_commit": commit, "dirty": bool(status), "source": str(source)}
    return {"version": getattr(slurmtune, "__version__", None), "source": str(source)}


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on the compute node
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def redact(text: str) -> str:
    """Blank the value of every assignment to a secret-looking name (``HF_TOKEN=...``)."""
    def blank(match: re.Match) -> str:
        if SECRET_NAME.search(match.group("name")):
            return f"{match.group('name')}{match.group('sep')}{REDACTED}"
        return match.group(0)

    for pattern in _ASSIGNMENTS:
        text = pattern.sub(blank, text)
    return text


def _scrub(lineage: dict) -> dict:
    """Remove the value of any secret-looking variable of this process, wherever it ended up."""
    secrets = [v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6]
    if not secrets:
        return lineage
    text = json.dumps(lineage, ensure_ascii=False)
    for value in secrets:
        text = text.replace(json.dumps(value, ensure_ascii=False)[1:-1], REDACTED)
    return json.loads(text)
