"""Run manifests: typed dataclasses are the schema, YAML files and ``key.sub=value``
overrides fill them in.

::

    cfg = load_manifest("manifests/quickstart.yaml", ["train.lr=2e-4", "lora.r=8"])
    cfg.train.lr        # 0.0002
    print(to_yaml(cfg))  # what `slurmtune config` prints

Every field's default and meaning is written once, here. A key the schema does
not know is an error listing the valid keys of its section; a value of the
wrong type is an error naming the key, the value and the expected type. All
problems of a manifest are collected and reported together.

Relative paths in a manifest are relative to the manifest's own folder (so a
manifest works from any working directory); relative paths given as overrides
on the command line are relative to the working directory, as the shell user
expects.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from slurmtune.errors import ConfigError, UsageError


# libyaml's loader when present: 10x faster than the pure-Python one, same results.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: same text, ~10x faster


def _path(default=None, doc: str = ""):
    """A field holding a filesystem path (resolved against the manifest's folder)."""
    return field(default=default, metadata={"path": True, "doc": doc})


def _paths(doc: str = ""):
    return field(default_factory=list, metadata={"path": True, "doc": doc})


@dataclass
class DataConfig:
    """What the run converts, trains on and evaluates on."""

    format: str = "chat"  # converter of `inputs` (see `slurmtune convert --help`)
    inputs: list[str] = _paths("raw source files for the convert step")
    options: dict[str, str] = field(default_factory=dict)  # converter options, e.g. clean_replacement
    split: float | None = None  # share of converted rows kept for training; the rest validates
    on_error: Literal["fail", "skip"] = "fail"  # invalid source rows: stop, or drop them (rejected.jsonl)
    train_files: list[str] = _paths("canonical chat / prompt-completion training files")
    validation_file: str | None = _path(doc="file for validation loss and early stopping")
    eval_file: str | None = _path(doc="file the eval array generates answers for")
    seed: int = 42  # seed of every split and shuffle of the data


@dataclass
class ModelConfig:
    """The base model. Compute nodes are offline: a local folder or HF cache path."""

    path: str = _path("", doc="local model folder or Hugging Face cache snapshot")
    tiny_arch: str | None = None  # build a random tiny model at `path` when missing (demos, tests)
    chat_template: str | None = _path(doc="Jinja chat template file that replaces the model's")
    # The attention kernel for training. Packing only pays with one that skips the other rows of a
    # packed batch (flash_attention_2, flex_attention: GPU only); sdpa computes the whole block.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainConfig:
    """Defaults follow the course-assistant recipe (2 epochs, batch 1 x 8, lr 1e-4)."""

    method: Literal["qlora", "lora-8bit", "lora"] = "qlora"
    epochs: float = 2.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 1  # per device
    grad_accum: int = 8
    lr: float = 1e-4
    warmup_ratio: float = 0.03
    max_length: int = 1024  # tokens; longer rows are truncated (see `slurmtune validate --tokenizer`)
    packing: bool = False  # padding-free batches of several rows
    loss_on: Literal["assistant", "all"] = "assistant"
    early_stopping_patience: int = 3  # evaluations without improvement; used with a validation file
    save_steps: int = 50
    save_each_epoch: bool = False
    keep_last: int = 2  # complete checkpoints kept on disk
    seed: int = 42
    resume: Literal["auto", "never", "force"] = "auto"


@dataclass
class EvalConfig:
    shards: int = 1  # array tasks the eval set is split into
    array_parallelism: int = 4  # at most this many shards run at once (%K)
    max_new_tokens: int = 256
    batch_size: int = 8
    normalize: bool = True  # exact match ignores case and surrounding whitespace


@dataclass
class SlurmConfig:
    """Where and how jobs run. Site facts (partition, account, ...) live in slurm/ profiles."""

    cluster: str | None = None  # profile name in slurm/ (e.g. local-test) or a YAML path
    executor: Literal["auto", "slurm", "local", "debug"] = "auto"
    time_min: int = 60  # wall time of the train job
    gpus: int = 1  # per node, for the train job
    cpus_per_gpu: int | None = None  # default: the profile's
    mem_gb_per_gpu: int | None = None  # default: the profile's


@dataclass
class DistributedConfig:
    nodes: int = 1
    gpus_per_node: int = 1
    deepspeed: str | None = _path(doc="DeepSpeed config in manifests/deepspeed/")
    # Samples per optimizer step over all processes; when set, batch_size x grad_accum x
    # nodes x gpus_per_node must equal it (checked on the login node, which says the fix).
    global_batch_size: int | None = None
    # Seconds a rendezvous or a collective may wait for the other ranks before the job
    # fails: a dead or hung rank ends the job within about this, not at its time limit.
    timeout_s: int = 300
    # gpu: one task per GPU (--gres), NCCL. cpu: gpus_per_node counts CPU processes per
    # node, no GPU is asked for or used, gloo (tests, CPU-only clusters).
    device: Literal["gpu", "cpu"] = "gpu"


@dataclass
class SweepConfig:
    """Trials of a sweep (see slurmtune.runs.sweep); each factor given multiplies the others."""

    grid: dict[str, list[Any]] = field(default_factory=dict)  # key -> values: cartesian product
    paired: dict[str, list[Any]] = field(default_factory=dict)  # key -> values: zipped together
    random: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> {log_uniform|uniform|int_uniform: [lo, hi]} or {choice: [...]}
    samples: int = 0  # random draws
    seed: int = 0  # of the random draws
    trials: list[dict[str, Any]] = field(default_factory=list)  # explicit override sets
    parallelism: int = 4  # trials running at once (%K of the array)
    metric: str = "eval_loss"  # eval_loss, train_loss, pass_rate, or a path in eval_report.json
    mode: Literal["min", "max"] = "min"


@dataclass
class RunConfig:
    """A whole run: convert -> validate -> train -> eval -> report."""

    name: str = "run"
    description: str = ""
    output_dir: str = "runs"  # run folders are created here (relative to the working directory)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


# --- loading --------------------------------------------------------------------------

def load_manifest(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML manifest, apply ``key.sub=value`` overrides, check every type."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such manifest file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=SAFE_LOADER) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UsageError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping of sections at the top level")
    problems: list[str] = []
    cfg = _build(RunConfig, raw, "", problems, base=path.resolve().parent)
    for override in overrides:
        _apply_override(cfg, override, problems)
    if problems:
        raise ConfigError(problems, source=str(path))
    return cfg


def build(cls, raw: Any, source: str, base: Path | None = None):
    """Any schema dataclass from a plain mapping, with the same checks as a manifest."""
    problems: list[str] = []
    obj = _build(cls, raw, "", problems, base=base)
    if problems:
        raise ConfigError(problems, source=source)
    return obj


def from_dict(raw: dict, base: Path | None = None) -> RunConfig:
    """Build a config from a plain dict (e.g. a resolved manifest saved in a run folder)."""
    problems: list[str] = []
    cfg = _build(RunConfig, raw, "", problems, base=base)
    if problems:
        raise ConfigError(problems)
    return cfg


def apply_values(cfg: RunConfig, values: dict[str, Any], source: str = "overrides",
                 base: Path | None = None) -> RunConfig:
    """A copy of ``cfg`` with typed values set by dotted key (``{"train.lr": 2e-4}``), checked
    like a manifest; relative paths among the values resolve against ``base``."""
    raw = to_dict(cfg)
    problems = []
    for key, value in values.items():
        target, parts = raw, key.split(".")
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                problems.append(f"{key}: unknown key")
                break
            target = target[part]
        else:
            if parts[-1] not in target:
                problems.append(f"{key}: unknown key")
            else:
                target[parts[-1]] = value
    if problems:
        raise ConfigError(problems, source=source)
    return build(RunConfig, raw, source, base=base)


@functools.cache
def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates the string annotations: slow, so once per class


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.dump(to_dict(cfg), Dumper=SAFE_DUMPER, sort_keys=False, default_flow_style=False)


def _build(cls, raw: Any, prefix: str, problems: list[str], base: Path | None):
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'manifest'}: expected a mapping, got {_show(raw)}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _type_hints(cls)
    unknown = [k for k in raw if k not in fields]
    for key in unknown:
        problems.append(_unknown_key(prefix, str(key), fields))
    values = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], value, key + ".", problems, base)
            continue
        ok, converted = _check(value, hints[name])
        if not ok:
            problems.append(f"{key}: {_show(value)} is not {_type_name(hints[name])}")
            continue
        if fields[name].metadata.get("path") and base is not None:
            converted = _resolve(converted, base)
        values[name] = converted
    return cls(**values)


def _unknown_key(prefix: str, key: str, fields: dict) -> str:
    section = prefix.rstrip(".") or "top level"
    hint = difflib.get_close_matches(key, fields, n=1)
    maybe = f" (did you mean '{hint[0]}'?)" if hint else ""
    return f"{prefix}{key}: unknown key{maybe}; valid keys of {section}: {', '.join(fields)}"


def _apply_override(cfg: RunConfig, override: str, problems: list[str]) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        problems.append(f"{override}: expected key.sub=value")
        return
    parts = key.strip().split(".")
    target = cfg
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(target)}
        if part not in fields:
            problems.append(_unknown_key("".join(p + "." for p in parts[:i]), part, fields))
            return
        hint = _type_hints(type(target))[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(hint):
                problems.append(f"{key}: '{'.'.join(parts[:i + 1])}' has no sub-keys")
                return
            target = getattr(target, part)
            continue
        if dataclasses.is_dataclass(hint):
            problems.append(f"{key}: is a section; set one of its keys, e.g. {key}.{dataclasses.fields(hint)[0].name}=...")
            return
        value = _parse_override_value(text, hint)
        ok, converted = _check(value, hint)
        if not ok:
            problems.append(f"{key}: {_show(value)} is not {_type_name(hint)}")
            return
        if fields[part].metadata.get("path"):
            converted = _resolve(converted, Path.cwd())
        setattr(target, part, converted)


def _parse_override_value(text: str, hint) -> Any:
    """Strings stay as typed; everything else is read as YAML (numbers, lists, null)."""
    allows_none = _is_optional(hint)
    core = _strip_optional(hint)
    if allows_none and text.strip().lower() in ("null", "none", "~", ""):
        return None
    if core is str or typing.get_origin(core) is Literal:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# --- type checks ----------------------------------------------------------------------

def _is_optional(hint) -> bool:
    return _is_union(hint) and type(None) in typing.get_args(hint)


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _strip_optional(hint):
    if _is_optional(hint):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return hint


def _check(value: Any, hint) -> tuple[bool, Any]:
    """(ok, value converted to the field's type). ints widen to float; YAML's '1e-4' string too."""
    if _is_optional(hint):
        if value is None:
            return True, None
        hint = _strip_optional(hint)
    origin = typing.get_origin(hint)
    if origin is Literal:
        return (value in typing.get_args(hint)), value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is str:
            value = [str(value)]  # a single value where a list is expected
        if not isinstance(value, list):
            return False, value
        checked = [_check(v, item) for v in value]
        return all(ok for ok, _ in checked), [v for _, v in checked]
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            return False, value
        checked = {str(k): _check(v, item) for k, v in value.items()}
        return all(ok for ok, _ in checked.values()), {k: v for k, (_, v) in checked.items()}
    if hint is Any:
        return True, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return isinstance(value, str), value
    return False, value


def _type_name(hint) -> str:
    if _is_optional(hint):
        return _type_name(_strip_optional(hint)) + " or null"
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if hint is Any:
        return "a value"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number",
            str: "a string"}.get(hint, str(hint))


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _resolve(value, base: Path):
    if value in (None, ""):
        return value
    if isinstance(value, list):
        return [_resolve(v, base) for v in value]
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())
