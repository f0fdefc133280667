"""Every check of a command, made before anything is created or queued.

::

    problems = submission_problems(Submission(cfg, plan, profile, executor))
    # [] or every problem at once, each saying the fix; the command prints them and exits 1

    job_problems(cfg, "train")   # what the train job checks again on its node: the same function

A doomed job costs a queue wait; here it costs a second. Four layers, cheapest first:

1. ``job_problems``: the values, paths and resources of one job kind, from its config
   alone. The login node runs it for every job a command will submit (each trial of a
   sweep included) and each job runs it again when it starts on its node, where it finds
   nothing new: its inputs are the same manifest and the same shared storage.
2. the submission: GPUs for what each kind uses, the cluster profile's shared-storage
   rule, the cluster's partitions and limits (slurmtune.cluster.slurm gives them as plain
   data, so the rules here are pure and testable with recorded facts).
3. the data: the first rows rendered with the model's tokenizer and chat template, as
   training will see them. A run that starts from raw data (``data.inputs``) has them
   converted here in memory first, so a template or format problem fails now, not in
   the train job after convert and validate have run.
4. the estimate: each train job's peak GPU memory (slurmtune.train.estimate, from the
   model's config) against the partition's GPU (the profile, its probe or its gpu_type); a
   run that cannot fit is refused with the settings that would, a time limit shorter than
   the estimated time is a warning.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from slurmtune.cluster.profiles import ClusterProfile, GpuFacts, gpu_facts
from slurmtune.config import RunConfig
from slurmtune.schema import value_problems
from slurmtune.errors import DataError, SlurmtuneError
from slurmtune.runs.folder import Run, data_files, has_eval
from slurmtune.train.distributed import check_distributed, world_size

if TYPE_CHECKING:
    from slurmtune.train.estimate import Memory

PREVIEW_ROWS = 16  # rows tokenized on the login node
# GPUs each job kind can use, per node: more is waste that waits longer in the queue.
GPU_LIMITS = {"convert": 0, "validate": 0, "report": 0, "train": 1, "eval": 1, "trial": 1}
TRAINING_KINDS = ("train", "train_deepspeed", "trial")


class CheckFailed(SlurmtuneError):
    """A command's checks found problems; nothing was created or queued."""

    def __init__(self, problems: list[str], what: str = "not submitted"):
        self.problems, self.what = problems, what
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{what}: {len(problems)} problem(s):\n{lines}")

    def one_line(self) -> str:
        more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"{self.what}: {self.problems[0]}{more}"


@dataclass
class StepNeeds:
    """What one step asks of the scheduler, as the checks see it."""

    name: str
    kind: str
    gpus_per_node: int
    nodes: int
    time_min: int
    partition: str | None
    array_size: int | None = None


@dataclass
class ClusterFacts:
    partitions: dict  # name -> slurmtune.cluster.slurm.Partition
    max_array_size: int


@dataclass
class Submission:
    """Everything one command is about to submit."""

    cfg: RunConfig
    steps: list[StepNeeds]
    profile: ClusterProfile
    executor: str
    only: str | None = None  # `slurmtune submit STEP`
    existing: Run | None = None  # submitting into a run folder that exists
    trials: list = field(default_factory=list)  # a sweep's trials (slurmtune.runs.sweep.Trial)


def raise_problems(problems: list[str], what: str = "not submitted") -> None:
    if problems:
        raise CheckFailed(problems, what)


# --- 1. one job, from its config --------------------------------------------------------

def job_problems(cfg: RunConfig, kind: str) -> list[str]:
    """Everything that makes a job of ``kind`` pointless to run, each with its fix."""
    problems = value_problems(cfg)
    if kind in ("convert", "trial") and cfg.data.inputs:
        problems += convert_problems(cfg)
    problems += path_problems(cfg, kind)
    if kind in TRAINING_KINDS or kind == "eval":
        problems += model_problems(cfg)
    if kind in TRAINING_KINDS:
        problems += training_problems(cfg, kind)
    if kind in ("eval", "report") and not has_eval(cfg):
        problems.append("nothing to evaluate: set data.eval_file (or data.split / data.validation_file)")
    return _unique(problems)


def convert_problems(cfg: RunConfig) -> list[str]:
    from slurmtune.data.converters import FORMATS, get_converter
    from slurmtune.data.converters.base import FLAG_TEXT

    if cfg.data.format not in FORMATS:
        return [f"data.format: {cfg.data.format!r}; expected one of {', '.join(FORMATS)}"]
    known = {opt.name: opt for opt in get_converter(cfg.data.format).options}
    problems = [f"data.options.{name}: not an option of {cfg.data.format}; options: "
                f"{', '.join(known) or 'none'}" for name in cfg.data.options if name not in known]
    problems += [f"data.options.{opt.name}: required by {cfg.data.format} ({opt.help})"
                 for opt in known.values() if opt.required and not cfg.data.options.get(opt.name)]
    problems += [f"data.options.{opt.name}: {cfg.data.options[opt.name]!r} is not on or off; expected true or false"
                 for opt in known.values() if opt.flag and opt.name in cfg.data.options
                 and str(cfg.data.options[opt.name]).strip().lower() not in FLAG_TEXT]
    return problems


def path_problems(cfg: RunConfig, kind: str) -> list[str]:
    """The files a job of ``kind`` reads that the manifest names (not those convert writes)."""
    d = cfg.data
    named = [(f"data.inputs[{i}]", p) for i, p in enumerate(d.inputs)] if kind in ("convert", "trial") else []
    if not d.inputs:
        named += [(f"data.train_files[{i}]", p) for i, p in enumerate(d.train_files)]
    if d.validation_file and not (d.inputs and d.split):
        named.append(("data.validation_file", d.validation_file))
    if d.eval_file:
        named.append(("data.eval_file", d.eval_file))
    problems = [f"{key}: {path}: no such file" for key, path in named if not Path(path).is_file()]
    if kind in TRAINING_KINDS and not d.inputs and not d.train_files:
        problems.append("data.train_files: empty; expected at least one chat or prompt-completion file "
                        "(or data.format + data.inputs to convert raw data)")
    return problems


def model_problems(cfg: RunConfig) -> list[str]:
    path = cfg.model.path
    if not path:
        return ["model.path: empty; expected a local model folder (compute nodes are offline)"]
    if cfg.model.tiny_arch or (Path(path) / "config.json").is_file():
        return []
    return [f"model.path: {path}: no such model folder (no config.json); compute nodes are offline, "
            "so download it first on the login node: slurmtune fetch-model NAME"]


def training_problems(cfg: RunConfig, kind: str) -> list[str]:
    from slurmtune.data.vision import is_vision_model

    problems = attention_problems(cfg) + kernel_problems(cfg)
    if cfg.lora.vision and (Path(cfg.model.path) / "config.json").is_file() and not is_vision_model(cfg.model.path):
        problems.append(f"lora.vision={cfg.lora.vision}: {cfg.model.path} has no vision tower; fix: lora.vision=[]")
    world = world_size(cfg)
    if kind == "train_deepspeed":
        return problems + check_distributed(cfg)
    if cfg.train.method == "qlora" and world > 1:
        problems.append("QLoRA with several GPUs is not supported: use train.method=lora (or lora-8bit) "
                        "with distributed.*, or one GPU with qlora")
    elif kind == "trial" and world > 1:
        problems.append(f"distributed.nodes x gpus_per_node = {world}, but a sweep trial trains in one "
                        "process (one array task each); fix: distributed.nodes=1 distributed.gpus_per_node=1, "
                        "or run the multi-GPU training as its own run (slurmtune run)")
    if kind == "train" and cfg.slurm.gpus > 1:
        why = "QLoRA trains on one GPU" if cfg.train.method == "qlora" else "the train job uses one GPU"
        problems.append(f"train: {cfg.slurm.gpus} GPUs requested but {why}; fix: slurm.gpus=1, or "
                        "distributed.gpus_per_node=N with method lora for DeepSpeed")
    return problems


def attention_problems(cfg: RunConfig) -> list[str]:
    """The training attention kernel against where the run trains."""
    impl = cfg.model.attn_implementation
    problems = []
    on_cpu = _trains_on_cpu(cfg)
    if impl in ("flash_attention_2", "flex_attention") and on_cpu:
        problems.append(f"model.attn_implementation={impl} trains on GPUs only (it has no backward pass on "
                        "CPU) but this run trains on CPU; fix: model.attn_implementation=sdpa, or slurm.gpus=1")
    if impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        problems.append("model.attn_implementation=flash_attention_2 needs the flash-attn package, which this "
                        "environment lacks; fix: install a flash-attn wheel built for this torch and CUDA, "
                        "or use flex_attention (part of torch)")
    return problems


def kernel_problems(cfg: RunConfig) -> list[str]:
    """Fused kernels against where the run trains and what is installed."""
    if cfg.train.kernels != "liger":
        return []
    problems = []
    if _trains_on_cpu(cfg):
        problems.append("train.kernels=liger runs on GPUs only (its kernels are Triton, which has no CPU "
                        "backend) but this run trains on CPU; fix: train.kernels=default, or slurm.gpus=1")
    if importlib.util.find_spec("liger_kernel") is None:
        problems.append("train.kernels=liger needs the liger-kernel package, which this environment lacks; "
                        "fix: pip install -r env/requirements-gpu.txt into the run's environment, or "
                        "train.kernels=default")
    return problems


def _trains_on_cpu(cfg: RunConfig) -> bool:
    return cfg.distributed.device == "cpu" if world_size(cfg) > 1 else cfg.slurm.gpus == 0


def packing_notice(cfg: RunConfig) -> str | None:
    if cfg.train.packing and cfg.model.attn_implementation in ("sdpa", "eager"):
        return (f"notice: train.packing with {cfg.model.attn_implementation} attention computes each packed "
                "batch as one block (no padding, but attention across rows that a mask then hides); with "
                "long rows that is slower than padding (bench/RESULTS.md). On GPUs set "
                "model.attn_implementation=flex_attention or flash_attention_2")
    return None


# --- 2. the submission -------------------------------------------------------------------

def submission_problems(sub: Submission, facts: ClusterFacts | None = None) -> list[str]:
    """Every problem of a command's jobs (layers 1 and 2; layer 3 when those pass)."""
    problems = []
    for step in sub.steps:
        problems += job_problems(sub.cfg, step.kind)
    problems += _trial_problems(sub)
    problems += gpu_problems(sub.steps)
    problems += shared_path_problems(sub.cfg, sub.profile)
    if facts is not None:
        problems += cluster_problems(sub.steps, facts)
    if sub.only and sub.existing is None and sub.only not in ("convert", "validate") and sub.cfg.data.inputs:
        problems.append(f"{sub.only}: this manifest's data is converted by the pipeline; run the whole "
                        "pipeline (slurmtune run) or submit into an existing run")
    problems = _unique(problems)
    if not problems and any(step.kind in TRAINING_KINDS for step in sub.steps):
        problems += data_problems(sub)
    return problems


def _trial_problems(sub: Submission) -> list[str]:
    """Each trial's own resolved config, as its array task will check it on the node."""
    base = set(job_problems(sub.cfg, "trial")) if sub.trials else set()
    problems = []
    for trial in sub.trials:
        label = ", ".join(f"{k}={v}" for k, v in trial.overrides.items())
        problems += [f"sweep trial {trial.id} ({label}): {p}" for p in job_problems(trial.config, "trial")
                     if p not in base]
    return problems


def gpu_problems(steps: list[StepNeeds]) -> list[str]:
    problems = []
    for step in steps:
        limit = GPU_LIMITS.get(step.kind)
        if limit is not None and step.gpus_per_node > limit and step.kind not in TRAINING_KINDS:  # those: job_problems
            problems.append(f"{step.name}: {step.gpus_per_node} GPUs requested but the {step.kind} job uses "
                            f"{limit} GPU(s); fix: ask for {limit}")
    return problems


def shared_path_problems(cfg: RunConfig, profile: ClusterProfile | None) -> list[str]:
    if not profile or not profile.require_shared_paths:
        return []
    shared = [str(Path(p)) for p in profile.shared_prefixes]
    d = cfg.data
    named = [(f"data.inputs[{i}]", p) for i, p in enumerate(d.inputs)]
    named += [(f"data.train_files[{i}]", p) for i, p in enumerate(d.train_files)]
    named += [(k, v) for k, v in (("data.validation_file", d.validation_file), ("data.eval_file", d.eval_file),
                                  ("model.path", cfg.model.path)) if v]
    return [f"{key}: {path} is not on shared storage ({', '.join(shared)}); compute nodes cannot see it: "
            "move it there" for key, path in named if not _under_any(Path(path).resolve(), shared)]


def _under_any(path: Path, prefixes: list[str]) -> bool:
    return any(str(path) == p or str(path).startswith(p.rstrip("/") + "/") for p in prefixes)


def cluster_problems(steps: list[StepNeeds], facts: ClusterFacts) -> list[str]:
    problems = []
    default = next((p for p in facts.partitions.values() if p.default), None)
    for step in steps:
        part = facts.partitions.get(step.partition) if step.partition else default
        if step.partition and part is None:
            problems.append(f"{step.name}: partition {step.partition!r} does not exist; partitions: "
                            f"{', '.join(facts.partitions)}")
        elif part is not None:
            problems += _partition_problems(step, part, facts.max_array_size)
    return problems


def _partition_problems(step: StepNeeds, part, max_array_size: int) -> list[str]:
    problems = []
    if part.max_time_min is not None and step.time_min > part.max_time_min:
        problems.append(f"{step.name}: {step.time_min} min is above partition {part.name}'s MaxTime "
                        f"of {part.max_time_min} min; fix: slurm.time_min={part.max_time_min} "
                        "(training resumes across requeues) or another partition")
    if step.gpus_per_node > part.gpus_per_node:
        problems.append(f"{step.name}: {step.gpus_per_node} GPUs per node requested but partition "
                        f"{part.name}'s nodes have {part.gpus_per_node}; fix: ask for at most "
                        f"{part.gpus_per_node}")
    if step.nodes > len(part.nodes):
        problems.append(f"{step.name}: {step.nodes} nodes requested but partition {part.name} has "
                        f"{len(part.nodes)}")
    if step.array_size and step.array_size > max_array_size:
        problems.append(f"{step.name}: an array of {step.array_size} tasks is above the cluster's "
                        f"MaxArraySize of {max_array_size}; fix: fewer shards")
    return problems


# --- 3. the data, as training will see it ---------------------------------------------------

@dataclass
class Preview:
    """The first rows of a run's training data, as canonical records, and what was tokenized."""

    records: list[dict]
    source: str  # where they came from, for messages
    report: dict | None = None  # count_trained_tokens' numbers


def data_problems(sub: Submission) -> list[str]:
    """Tokenize the first training rows with the model's template, here on the login node:
    a run that would train on nothing, or whose template cannot mark the trained tokens,
    fails now, not after its wait in the queue. Prints the trained-token share."""
    import sys

    from slurmtune.data.vision import is_vision_model

    if is_vision_model(sub.cfg.model.path):
        return vision_data_problems(sub)
    try:
        preview = preview_training(sub.cfg, sub.existing.dir if sub.existing else None)
    except SlurmtuneError as e:
        return [f"train: {e}"]
    if preview is None:
        return []
    report = preview.report
    print(f"preflight: {report['trained_tokens']}/{report['tokens']} tokens trained "
          f"({report['trained_share']:.0%}) in the first {report['rows']} rows of {preview.source}", file=sys.stderr)
    notice = packing_notice(sub.cfg)
    if notice:
        print(notice, file=sys.stderr)
    return estimate_problems(sub, preview)


def vision_data_problems(sub: Submission) -> list[str]:
    """A vision-language run's training rows (see vision_preview), then its estimate."""
    if sub.cfg.train.packing:
        return ["train.packing: the vision recipe pads its batches (packed rows would share image features); "
                "fix: train.packing=false"]
    try:
        preview, problems = vision_preview(sub.cfg, sub.existing.dir if sub.existing else None)
    except SlurmtuneError as e:
        return [f"train: {e}"]
    return problems or (estimate_problems(sub, preview) if preview else [])


def vision_preview(cfg: RunConfig, run_dir: Path | None) -> tuple[Preview | None, list[str]]:
    """Every training row of a vision-language run (the first rows of the raw inputs, converted in
    memory, when convert has not written them yet): each image and video opens and has pixels or
    frames, and its text + media tokens fit train.max_length, counted from the files' sizes and
    lengths (nothing decoded, nothing written). Prints the trained-token share."""
    import sys

    from slurmtune.data.dataset import read_train_files
    from slurmtune.data.records import media_paths
    from slurmtune.data.validate import row_media_problem
    from slurmtune.data.vision import VisionSettings, load_encoder, media_parts, with_absolute_media

    files, _ = data_files(cfg, run_dir or ".")
    if files and all(Path(f).is_file() for f in files):
        data, source = read_train_files(files), files[0]
    elif cfg.data.inputs and run_dir is None:
        data, source = _converted_preview(cfg)
    else:
        return None, []  # written by an earlier step of this run, whose validate step opens the media
    v = cfg.vision
    encoder = load_encoder(cfg.model.path, VisionSettings(v.fps, v.max_frames, v.max_pixels), cache_dir=None)
    problems, tokens, trained = [], 0, 0
    counted: list[tuple[int, list]] = []  # each row's text tokens and media, for the estimate
    for n, record in enumerate(data.records, 1):
        record = with_absolute_media(record, data.row(n))
        bad = [f"{data.row(n)}: {field}: {why}" for field, path in media_paths(record)
               for why in [row_media_problem(path, field, Path(source))] if why]
        if bad:
            problems += bad
            continue
        try:
            total, media, learned = encoder.count(record, data.row(n))
        except DataError as e:
            problems.append(str(e))
            continue
        tokens, trained = tokens + total, trained + learned
        counted.append((total - media, media_parts(record["messages"])))
        if total > cfg.train.max_length:
            problems.append(f"{data.row(n)}: {encoder.too_long(total, media, cfg.train.max_length)}")
    if any("file not found" in p for p in problems) and "media_root" in cfg.data.options:
        problems.append(f"data.options.media_root: {cfg.data.options['media_root']} does not hold the export's "
                        "videos above; fix: data.options.media_root=FOLDER (the one their relative paths start in)")
    if not problems:
        print(f"preflight: {trained}/{tokens} tokens trained ({trained / max(1, tokens):.0%}) in "
              f"{len(data.records)} rows of {source}, images and video counted", file=sys.stderr)
    report = {"rows": len(data.records), "tokens": tokens, "trained_tokens": trained,
              "trained_share": trained / max(1, tokens), "longest": _longest_rows(encoder, counted, v)}
    return Preview(data.records, source, report), problems


def preview_training(cfg: RunConfig, run_dir: Path | None) -> Preview | None:
    """The first rows tokenized as training will (None when there is nothing to read yet:
    data that an earlier step of an existing run writes)."""
    from slurmtune.data.dataset import count_trained_tokens, prepare_tokenizer, read_train_files
    from slurmtune.data.vision import is_vision_model

    if is_vision_model(cfg.model.path):
        preview, problems = vision_preview(cfg, run_dir)
        raise_problems(problems, "the training rows")
        return preview

    tokenizer = None
    if not (Path(cfg.model.path) / "config.json").is_file():
        if not cfg.model.tiny_arch:
            return None  # model_problems said so
        from slurmtune.train.tiny_model import build_tokenizer
        tokenizer = build_tokenizer()  # the job builds the model; its tokenizer is built alike, in memory

    if cfg.data.inputs and run_dir is None:
        data, source = _converted_preview(cfg)
    else:
        files, _ = data_files(cfg, run_dir or ".")
        if not files or not all(Path(f).is_file() for f in files):
            return None
        data, source = read_train_files(files, limit=PREVIEW_ROWS), files[0]
    tokenizer, template = prepare_tokenizer(cfg, data.kind, tokenizer)
    return Preview(data.records, source, count_trained_tokens(cfg, tokenizer, data, template))


def _longest_rows(encoder, counted: list[tuple[int, list]], v) -> dict:
    """The longest row's tokens (what a batch is padded to, for the memory estimate), and the
    longest under half or a quarter of the pixels and half the frames, recounted from the files'
    sizes: ``{"tokens": 2510, "smaller": {"vision.max_pixels=100352": 1290, ...}}``."""
    from slurmtune.data.vision import VisionSettings

    def longest(enc) -> int:
        return max((text + sum(enc.media_tokens(kind, path) for kind, path in parts) for text, parts in counted),
                   default=0)

    options = [(f"vision.max_pixels={v.max_pixels // k}", VisionSettings(v.fps, v.max_frames, v.max_pixels // k))
               for k in (2, 4) if v.max_pixels // k >= encoder.factor ** 2]
    if any(kind == "video" for _, parts in counted for kind, _ in parts) and v.max_frames >= 4:
        options.append((f"vision.max_frames={v.max_frames // 2}", VisionSettings(v.fps, v.max_frames // 2, v.max_pixels)))
    return {"tokens": longest(encoder), "smaller": {label: longest(encoder.with_settings(s)) for label, s in options}}


def _converted_preview(cfg: RunConfig) -> tuple["TrainRecords", str]:
    """The first rows of ``data.inputs`` through the run's converter, in memory: what the
    convert step will write to train.jsonl (consent-excluded and invalid rows left out,
    as there), as training records."""
    from slurmtune.data.converters import get_converter
    from slurmtune.data.converters.base import Excluded, Rejected, Skipped
    from slurmtune.data.dataset import KIND_OF_FORMAT, TRAINABLE_FORMATS, TrainRecords, trainable_body
    from slurmtune.data.validate import detect_format

    converter = get_converter(cfg.data.format)(**cfg.data.options)
    first = converter.outputs[0]
    records = []
    for where, item in converter.rows([Path(p) for p in cfg.data.inputs]):
        if item.error:
            continue  # the convert step reports it with its line; the preview only needs good rows
        try:
            records += [r for name, r in converter.convert(item.value, where) if name == first]
        except (Rejected, Excluded, Skipped):
            continue
        if len(records) >= PREVIEW_ROWS:
            break
    records += [r for name, r in converter.finish() if name == first]
    source = f"{cfg.data.format} data converted from {Path(cfg.data.inputs[0]).name}"
    if not records:
        raise SlurmtuneError(f"the first rows of {', '.join(cfg.data.inputs)} convert to no training record "
                             f"({cfg.data.format}); check them with: slurmtune convert {cfg.data.format} "
                             f"{' '.join(cfg.data.inputs)} --out DIR")
    fmt = detect_format(records[0], False)
    if fmt not in TRAINABLE_FORMATS:
        raise SlurmtuneError(f"data.format={cfg.data.format} writes {fmt!r} records, which the text recipe "
                             "cannot train on; fix: a chat output of the converter (e.g. data.options.chat: "
                             "'true' where it has one)")
    kept = records[:PREVIEW_ROWS]
    return TrainRecords(KIND_OF_FORMAT[fmt], [trainable_body(r) for r in kept],
                        where=[_source_row(n, r.get("meta"), converter.list_keys) for n, r in enumerate(kept, 1)]), source


def _source_row(n: int, meta, list_keys: tuple[str, ...]) -> str:
    """A row converted in memory as messages name it: the source row it came from
    (``exported.json:6: evaluations[4]``), or the evaluations a pair joins."""
    meta = meta if isinstance(meta, dict) else {}
    if meta.get("file") and meta.get("line"):
        place = f"{meta['file']}:{meta['line']}"
        key = list_keys[0] if list_keys else ""
        return place + (f": {key}[{meta['index']}]" if meta.get("index") is not None else "")
    ids = meta.get("evaluation_ids")
    return f"record {n} (evaluations {', '.join(map(str, ids))})" if isinstance(ids, list) else f"record {n}"


# --- 4. the memory and time estimate -------------------------------------------------------

@dataclass
class TrainEstimate:
    """One training job's estimate (the run's, or a sweep trial's) against its partition's GPU."""

    label: str  # "train", or "sweep trial ID"
    memory: Memory
    gpu: GpuFacts | None  # None: trains on CPU
    fixes: list[str]
    seconds: float | None = None
    tokens: float | None = None
    requeues: int = 0
    time_min: int = 0

    @property
    def fits(self) -> bool:
        usable = self.gpu.usable_bytes if self.gpu else None
        return usable is None or self.memory.total <= usable

    def lines(self) -> list[str]:
        from slurmtune.train.estimate import size

        where = "on CPU (host memory)" if self.gpu is None else "per GPU"
        line = f"estimate: {self.label} needs {self.memory.describe()} {where}"
        if self.gpu is not None:
            usable = self.gpu.usable_bytes
            line += (f" of {size(usable)} usable ({self.gpu.mem_gb:g} GB, {self.gpu.source})" if usable else
                     "; GPU memory unknown: set gpu_mem_gb (or gpu_type) in the cluster profile to check it")
        lines = [line]
        if self.seconds is not None:
            lines.append(f"estimate: {self.label} takes ~{_duration(self.seconds)} for ~{self.tokens:,.0f} tokens "
                         f"({self.gpu.tflops:g} TFLOP/s per GPU, {self.gpu.source})")
        return lines

    def problem(self) -> str | None:
        if self.fits:
            return None
        from slurmtune.train.estimate import size

        fix = ("; fix, each alone fits: " + " | ".join(self.fixes)) if self.fixes else \
            "; no single setting fits it: use a partition with bigger GPUs (or several GPUs with ZeRO-3)"
        return (f"{self.label}: estimated {self.memory.describe()} per GPU, more than the "
                f"{size(self.gpu.usable_bytes)} usable of a {self.gpu.mem_gb:g} GB GPU ({self.gpu.source}){fix}")

    def warning(self) -> str | None:
        if not self.requeues:
            return None
        return (f"warning: {self.label} is estimated at ~{_duration(self.seconds)} but slurm.time_min="
                f"{self.time_min}: it will be requeued ~{self.requeues} time(s) (it resumes from its checkpoints); "
                f"fix: slurm.time_min={math.ceil(self.seconds / 60 * 1.2)} if the partition allows it")


def estimate_problems(sub: Submission, preview: Preview, always: bool = False) -> list[str]:
    """Print each training job's estimate; a GPU run that cannot fit is a problem, a time limit
    shorter than the estimate a warning. ``always``: also when no GPU is known (``slurmtune
    estimate``); `run` prints nothing then, the local machine training on CPU."""
    import sys

    problems = []
    try:
        estimates = train_estimates(sub, preview, always)
    except SlurmtuneError as e:
        return [f"train: {e}"]
    for est in estimates:
        for line in est.lines() + [est.warning()]:
            if line:
                print(line, file=sys.stderr)
        problem = est.problem()
        problems += [problem] if problem else []
    return problems


def train_estimates(sub: Submission, preview: Preview, always: bool = False) -> list[TrainEstimate]:
    from slurmtune.train.estimate import Setting, estimate_memory, fixes, model_shape, requeues, train_seconds

    on_gpu = _estimates_gpu(sub)
    if not on_gpu and not always:
        return []
    gpu = gpu_facts(sub.profile) if on_gpu else None
    configs = [(f"sweep trial {t.id}", t.config) for t in sub.trials] or [("train", sub.cfg)]
    rows = _training_rows(sub.cfg, sub.existing.dir if sub.existing else None) if gpu and gpu.tflops else None
    report = preview.report or {}
    mean_row = report.get("tokens", 0) / max(1, report.get("rows", 1))
    shapes: dict = {}
    out = []
    for label, cfg in configs:
        key = (cfg.lora.r, tuple(cfg.lora.target_modules))
        shape = shapes[key] = shapes.get(key) or model_shape(cfg)
        setting = Setting.of(cfg, on_gpu)
        longest = report.get("longest")
        if longest and longest["tokens"] and cfg.vision == sub.cfg.vision:  # every row of a vision run counted
            setting = replace(setting, row_tokens=longest["tokens"], smaller_media=tuple(longest["smaller"].items()))
        est = TrainEstimate(label, estimate_memory(shape, setting), gpu,
                            fixes(shape, setting, gpu.usable_bytes) if gpu and gpu.usable_bytes else [])
        if rows and mean_row:
            est.tokens = _trained_tokens(cfg, rows, min(mean_row, cfg.train.max_length))
            est.seconds = train_seconds(shape, setting, est.tokens, gpu.tflops)
            est.time_min = cfg.slurm.time_min
            est.requeues = requeues(est.seconds, cfg.slurm.time_min, sub.profile.signal_lead_s)
        out.append(est)
    return out


def _estimates_gpu(sub: Submission) -> bool:
    """Whether the train job runs on a GPU: on SLURM as the manifest asks; here if this machine has one."""
    if _trains_on_cpu(sub.cfg):
        return False
    if sub.executor == "slurm":
        return True
    import torch
    return torch.cuda.is_available()


def _trained_tokens(cfg: RunConfig, rows: int, per_row: float) -> float:
    t = cfg.train
    if t.max_steps > 0:
        return t.max_steps * t.batch_size * t.grad_accum * world_size(cfg) * per_row
    return t.epochs * rows * per_row


def _training_rows(cfg: RunConfig, run_dir: Path | None) -> int | None:
    """Rows the train job will read: the records of the training files, or the raw inputs' rows (times
    data.split) when convert has not written them yet."""
    from slurmtune.data.dataset import count_rows

    files, _ = data_files(cfg, run_dir or ".")
    if files and all(Path(f).is_file() for f in files):
        return sum(count_rows(f) for f in files)
    if not cfg.data.inputs:
        return None
    from slurmtune.data.converters import get_converter

    converter = get_converter(cfg.data.format)(**cfg.data.options)
    rows = sum(1 for _, item in converter.rows([Path(p) for p in cfg.data.inputs]) if not item.error)
    return int(rows * (cfg.data.split or 1))


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{max(1, round(seconds / 60))} min"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --- 5. a server ---------------------------------------------------------------------------

def serve_problems(targets: list, engine: str, vllm_bin: str | None) -> list[str]:
    """Everything that would fail a server job (slurmtune.serve): the engine's limits, and
    adapter weights that name modules the base model lacks (from the safetensors headers)."""
    from slurmtune.data.adapter_keys import adapter_names_problem
    from slurmtune.serve.server import target_problems

    problems = target_problems(targets, engine, vllm_bin)
    for t in targets:
        if t.base and (Path(t.base) / "config.json").is_file():
            problem = adapter_names_problem(t.adapter, t.base)
            problems += [problem] if problem else []
    return problems
