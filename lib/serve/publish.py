"""Publishing an adapter to the model hub: its files and a model card made from its lineage.

::

    folder = stage("runs/r1/final", "out/", repo="ee340/course-assistant-lora")  # what would be pushed
    push(folder, "ee340/course-assistant-lora", private=True)                    # huggingface_hub

The folder holds the adapter (``adapter_config.json``, ``adapter_model.safetensors``), the
tokenizer files training saved beside it (the chat template the adapter was trained with) and
a ``README.md`` model card, nothing else: ``lineage.json`` stays home (it names hosts, paths
and the sbatch script), and no pickle is ever published. The card is made from
``lineage.json`` and the run's ``eval_report.json``: base model, method, LoRA shape, each data
file's sha256 and row count, the conversion's excluded counts, the metrics, the code revision.

Student data: an adapter whose lineage shows it was trained on SpeechGradebook or AITA rows
(by the data format, or by student ids in the training rows' ``meta``) is refused unless the
publisher says the data use is approved; the card then says so, since a model can reproduce
rows it was trained on. The hub token comes from ``HF_TOKEN`` or huggingface_hub's login
cache, read by huggingface_hub itself: it is never printed or written here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from slurmtune.data.jsonio import iter_records
from slurmtune.errors import SlurmtuneError, UsageError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")
CARD = "README.md"
# Source formats whose rows are students' work or words.
STUDENT_FORMATS = {"speechgradebook": "SpeechGradebook evaluations", "qwen-single": "SpeechGradebook evaluations",
                   "qwen-corrections": "SpeechGradebook evaluations", "qwen-pairs": "SpeechGradebook evaluations",
                   "aita": "AITA tutoring dialogues"}
STUDENT_META = ("student_id", "student", "learner_id")
ROWS_SCANNED = 1000  # per training file, for student ids in meta


def read_adapter(adapter_dir) -> tuple[Path, dict, dict | None]:
    """(the adapter folder, its lineage, the run's eval report or None); one line when it is not one."""
    adapter = Path(adapter_dir)
    missing = [name for name in (*ADAPTER_FILES, "lineage.json") if not (adapter / name).is_file()]
    if missing:
        raise UsageError(f"{adapter}: no {', '.join(missing)}; expected a trained adapter folder "
                         "(a run's final/)")
    lineage = json.loads((adapter / "lineage.json").read_text(encoding="utf-8"))
    report_file = adapter.parent / "eval_report.json"
    report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else None
    return adapter, lineage, report


def student_data(lineage: dict) -> list[str]:
    """Why the lineage shows student data ([] when it does not)."""
    data = (lineage.get("config") or {}).get("data") or {}
    reasons = []
    if data.get("format") in STUDENT_FORMATS:
        reasons.append(f"data.format={data['format']} ({STUDENT_FORMATS[data['format']]})")
    for f in lineage.get("data_files") or []:
        if _has_student_ids(Path(f.get("path", ""))):
            reasons.append(f"{Path(f['path']).name}: rows with a student id in meta")
    return reasons


def _has_student_ids(path: Path) -> bool:
    if not path.is_file():
        return False  # the data format still tells (student_data)
    try:
        for n, item in enumerate(iter_records(path)):
            if n >= ROWS_SCANNED:
                break
            meta = item.value.get("meta") if isinstance(item.value, dict) else None
            if isinstance(meta, dict) and any(meta.get(key) for key in STUDENT_META):
                return True
    except SlurmtuneError:  # unreadable now: judged by its format alone
        return False
    return False


def check_publishable(lineage: dict, data_use_approved: bool) -> list[str]:
    """The student-data reasons (refused unless approved)."""
    reasons = student_data(lineage)
    if reasons and not data_use_approved:
        raise UsageError(f"refused: this adapter was trained on student data ({'; '.join(reasons)}), and a "
                         "model can reproduce rows it was trained on; fix: publish only once that use is "
                         "approved (the students' consent and your institution's rules), then pass "
                         "--data-use-approved")
    return reasons


def stage(adapter_dir, out_dir, repo: str, data_use_approved: bool = False) -> Path:
    """Write the exact folder that would be pushed to ``out_dir`` (new or empty), all at once."""
    adapter, lineage, report = read_adapter(adapter_dir)
    reasons = check_publishable(lineage, data_use_approved)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not an empty folder; expected a new folder for the "
                         "files to publish")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in (*ADAPTER_FILES, *TOKENIZER_FILES):
            if (adapter / name).is_file():
                shutil.copyfile(adapter / name, tmp / name)
        adapter_config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        (tmp / CARD).write_text(model_card(repo, lineage, adapter_config, report, reasons), encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_card(repo: str, lineage: dict, adapter_config: dict, report: dict | None,
               student_reasons: list[str]) -> str:
    """README.md for the hub: front matter, then what the adapter is, what it saw, how it scored."""
    cfg = lineage.get("config") or {}
    base = str(adapter_config.get("base_model_name_or_path") or (cfg.get("model") or {}).get("path") or "")
    hub_base = base if base.count("/") == 1 and not base.startswith((".", "/")) else None
    front = ["---", "library_name: peft", "tags: [slurmtune, lora]"] + ([f"base_model: {hub_base}"] if hub_base else [])
    lines = front + ["---", "", f"# {repo.split('/')[-1]}", "",
                     f"A LoRA adapter for `{hub_base or Path(base).name}`, trained with slurmtune.", ""]
    lines += _training_section(cfg, adapter_config) + _data_section(lineage, student_reasons)
    lines += _metrics_section(report) + _code_section(lineage)
    return "\n".join(lines) + "\n"


def _training_section(cfg: dict, adapter_config: dict) -> list[str]:
    train = cfg.get("train") or {}
    targets = adapter_config.get("target_modules") or []
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
    return ["## Training", "",
            f"- method: {train.get('method')}, {train.get('epochs')} epochs (max_steps {train.get('max_steps')}), "
            f"lr {train.get('lr')}, batch {train.get('batch_size')} x {train.get('grad_accum')}, "
            f"max_length {train.get('max_length')}, loss on {train.get('loss_on')}, seed {train.get('seed')}",
            f"- LoRA: r {adapter_config.get('r')}, alpha {adapter_config.get('lora_alpha')}, "
            f"dropout {adapter_config.get('lora_dropout')}, on {targets}", ""]


def _data_section(lineage: dict, student_reasons: list[str]) -> list[str]:
    lines = ["## Data", "", "| file | rows | sha256 |", "|---|---|---|"]
    lines += [f"| {Path(f['path']).name} | {f['rows']} | `{f['sha256']}` |" for f in lineage.get("data_files") or []]
    conversion = lineage.get("conversion")
    if conversion:
        lines += ["", "Conversion: " + ", ".join(f"{k} {v}" for k, v in conversion.items())]
    if student_reasons:
        lines += ["", "**Student data.** Trained on student data (" + "; ".join(student_reasons) + "). The "
                  "publisher stated that this use is approved (consent and institutional rules). A model "
                  "can reproduce rows it was trained on."]
    return lines + [""]


def _metrics_section(report: dict | None) -> list[str]:
    if not report:
        return ["## Evaluation", "", "No eval report in the run folder.", ""]
    lines = ["## Evaluation", "", f"{report.get('n')} examples: {report.get('passed')} passed, "
             f"{report.get('failed')} failed.", "", "| metric | n | value |", "|---|---|---|"]
    for name, values in (report.get("metrics") or {}).items():
        if isinstance(values, dict) and values.get("n"):
            headline = _headline(values)
            if headline is not None:
                lines.append(f"| {name}.{headline[0]} | {values['n']} | {_shown(headline[1])} |")
    return lines + [""]


def _headline(values: dict) -> tuple[str, Any] | None:
    for key in ("accuracy", "rate", "within_1", "coverage", "arguments_match_rate", "valid_rate"):
        if key in values:
            return key, values[key]
    return None


def _shown(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _code_section(lineage: dict) -> list[str]:
    code = lineage.get("code") or {}
    revision = code.get("git_commit") or code.get("version") or "unknown"
    dirty = " (with uncommitted changes)" if code.get("dirty") else ""
    packages = ", ".join(f"{k} {v}" for k, v in (lineage.get("packages") or {}).items() if v)
    return ["## Reproducing", "", f"- slurmtune revision: {revision}{dirty}", f"- packages: {packages}", ""]


def hub_api():
    """huggingface_hub's client (token from HF_TOKEN or its login cache, read by the client)."""
    from huggingface_hub import HfApi
    return HfApi()


def push(folder, repo: str, private: bool, api=None) -> str:
    """Create ``repo`` if needed and upload ``folder`` as its content; the commit's URL."""
    from huggingface_hub.errors import HfHubHTTPError
    api = api or hub_api()
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(folder),
                                   commit_message="Upload adapter (slurmtune publish)")
    except (HfHubHTTPError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlurmtuneError(f"could not publish to {repo}: {reason} (is the hub reachable from this node, "
                             "and are you logged in: `hf auth login` or HF_TOKEN?)") from None
    return str(getattr(commit, "commit_url", commit))
