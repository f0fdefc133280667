"""Run manifests: typed dataclasses are the schema, YAML files and ``key.sub=value``
overrides fill them in.

::

    cfg = load_manifest("manifests/quickstart.yaml", ["train.lr=2e-4", "lora.r=8"])
    cfg.train.lr        # 0.0002
    print(to_yaml(cfg))  # what `slurmtune config` prints (to_yaml, value_problems: slurmtune.schema)
    value_problems(cfg)  # [] or e.g. ["train.lr: -1.0; expected a positive learning rate"]
    trial = apply_values(cfg, {"train.lr": 5e-5})  # a sweep trial: typed values by dotted key

Every field's default, meaning and constraints are written once, here, as the
field is declared (``field_(default, "doc", at_least(1))``); ``slurmtune config
--explain [KEY]`` prints them. A key the schema does not know is an error naming
the close match and listing the valid keys of its section, whether it comes from a
manifest, the command line or a sweep; a value of the wrong type is an error
naming the key, the value and the expected type. All problems of a manifest are
collected and reported together. Types are checked as values are set (a wrong
type is never stored); values that break a constraint are reported apart by
``value_problems`` (some constraints read another field of the section:
``train.save_steps`` is free with ``train.save_each_epoch``), which the
login-node checks run along with the paths and resources. ``schema.build`` does
both, for schemas with no such later check (cluster profiles).

Relative paths in a manifest are relative to the manifest's own folder (so a
manifest works from any working directory), and so are those of its sweep's
trials; relative paths given as overrides on the command line are relative to
the working directory, as the shell user expects.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from slurmtune.errors import ConfigError, UsageError
from slurmtune.schema import SAFE_LOADER, Rule, above, at_least, field_, fill, non_empty, section, set_value, share


# --- the schema ----------------------------------------------------------------------

@dataclass
class DataConfig:
    """What the run converts, trains on and evaluates on."""

    format: str = field_("chat", "format of `inputs`: chat, prompt-completion, alpaca or a course export "
                                 "(see `slurmtune convert --help`)")
    inputs: list[str] = field_([], "raw source files the convert step turns into training records", path=True)
    options: dict[str, str] = field_({}, "options of the format's converter, e.g. clean_replacement "
                                         "(see `slurmtune convert FORMAT --help`)")
    split: float | None = field_(None, "share of the converted rows kept for training (e.g. 0.9), never "
                                       "splitting a student; the rest validates. null: no split",
                                 share("a share between 0 and 1 (e.g. 0.9), or null", zero=False))
    on_error: Literal["fail", "skip"] = field_("fail", "invalid source rows: fail stops the convert step; "
                                                       "skip drops them and lists them in rejected.jsonl")
    train_files: list[str] = field_([], "canonical chat / prompt-completion files to train on", path=True)
    validation_file: str | None = field_(None, "file for validation loss and early stopping", path=True)
    eval_file: str | None = field_(None, "file the eval array generates answers for and scores", path=True)
    seed: int = field_(42, "seed of every split and shuffle of the data")


@dataclass
class ModelConfig:
    """The base model. Compute nodes are offline: a local folder or HF cache path."""

    path: str = field_("", "local model folder or Hugging Face cache snapshot (download it first on the "
                           "login node: `slurmtune fetch-model NAME`)", path=True)
    tiny_arch: str | None = field_(None, "build a random tiny model of this architecture (llama, mistral, "
                                         "phi3) at `path` when none is there: demos and tests")
    chat_template: str | None = field_(None, "Jinja chat template file that replaces the model's own",
                                       path=True)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = field_(
        "sdpa", "attention kernel for training. Packing only pays with one that skips the other rows of a "
                "packed batch (flash_attention_2, flex_attention: GPU only); sdpa computes the whole block")


@dataclass
class LoraConfig:
    """The adapter trained on top of the frozen base model."""

    r: int = field_(16, "rank of the adapter's matrices: more is more capacity, memory and time", at_least(1))
    alpha: int = field_(32, "scale of the adapter's update (alpha / r); commonly 2 x r",
                        above(0, "a positive number"))
    dropout: float = field_(0.05, "dropout on the adapter's input while training",
                            share("a value in [0, 1)"))
    target_modules: list[str] = field_(["q_proj", "k_proj", "v_proj", "o_proj"],
                                       "names of the base model's linear layers that get an adapter",
                                       non_empty("module names such as q_proj, v_proj"))
    vision: list[Literal["tower", "projector"]] = field_(
        [], "vision-language models: also adapt the vision tower's linear layers (tower) and/or the projector "
            "that maps its features into the language model (projector); []: both stay frozen")


@dataclass
class TrainConfig:
    """How the adapter is trained. Defaults follow the course-assistant recipe (2 epochs, batch 1 x 8,
    lr 1e-4)."""

    method: Literal["qlora", "lora-8bit", "lora"] = field_(
        "qlora", "base weights while training: qlora 4-bit (least memory), lora-8bit 8-bit, lora unquantized")
    epochs: float = field_(2.0, "passes over the training data (fractions allowed); max_steps > 0 overrides it",
                           Rule(lambda v, t: v > 0 or t.max_steps > 0, "epochs > 0 or max_steps > 0",
                                problem="{key} and {prefix}max_steps: expected {expected}"))
    max_steps: int = field_(-1, "optimizer steps to train; > 0 overrides epochs, -1 trains for epochs")
    batch_size: int = field_(1, "rows per device in each forward pass", at_least(1))
    grad_accum: int = field_(8, "forward passes per optimizer step: samples per step = batch_size x "
                                "grad_accum x processes", at_least(1))
    lr: float = field_(1e-4, "peak learning rate: reached after the warmup, then decayed linearly to 0",
                       above(0, "a positive learning rate"))
    warmup_ratio: float = field_(0.03, "share of the training steps over which the learning rate rises "
                                       "from 0 to lr", share())
    max_length: int = field_(1024, "tokens per row; longer rows are truncated (see `slurmtune validate "
                                   "--tokenizer`)", at_least(1, "1 or more tokens"))
    packing: bool = field_(False, "padding-free batches of several rows (pays with model.attn_implementation "
                                  "flash_attention_2 or flex_attention)")
    kernels: Literal["default", "liger"] = field_(
        "default", "fused training kernels: liger (liger-kernel's RMSNorm, RoPE, SwiGLU and fused linear "
                   "cross-entropy; GPU only, env/requirements-gpu.txt) or the model's own")
    gradient_checkpointing: Literal["auto", "on", "off"] = field_(
        "auto", "recompute activations in the backward pass: far less activation memory for ~1/3 more compute; "
                "auto: on for GPUs, off on CPU (see `slurmtune estimate`)")
    loss_on: Literal["assistant", "all"] = field_("assistant", "tokens the loss is computed on: the "
                                                               "assistant's answers, or all of each row")
    early_stopping_patience: int = field_(3, "evaluations without a better validation loss before training "
                                             "stops; used with a validation file", at_least(1))
    save_steps: int = field_(50, "optimizer steps between checkpoints (and validation-loss evaluations)",
                             at_least(1, unless="save_each_epoch"))
    save_each_epoch: bool = field_(False, "checkpoint (and evaluate) at the end of each epoch instead of "
                                          "every save_steps")
    keep_last: int = field_(2, "complete checkpoints kept on disk; a requeued job resumes from the newest",
                            at_least(1, "1 or more (resume needs a checkpoint)"))
    seed: int = field_(42, "seed of the adapter's initialization and of the training order")
    resume: Literal["auto", "never", "force"] = field_(
        "auto", "auto: continue from the newest complete checkpoint, if any; never: refuse a run folder that "
                "holds checkpoints; force: continue even though the config changed")


@dataclass
class VisionConfig:
    """How images and videos are given to a vision-language model (model.path with a vision tower)."""

    fps: float = field_(2.0, "frames taken per second of video; a longer video than max_frames / fps gets "
                             "max_frames spread over all of it", above(0, "a positive rate"))
    max_frames: int = field_(16, "frames per video, at most", at_least(1))
    max_pixels: int = field_(448 * 448, "pixels per image or frame, at most (sizes keep the aspect ratio)",
                             at_least(784, "at least 784 (one 28x28 merged patch)"))


@dataclass
class EvalConfig:
    """How the eval array generates answers for the eval set and scores them."""

    shards: int = field_(1, "array tasks the eval set is split into", at_least(1))
    array_parallelism: int = field_(4, "at most this many shards run at once (%K of the array)", at_least(1))
    max_new_tokens: int = field_(256, "tokens generated per answer, at most", at_least(1))
    batch_size: int = field_(8, "prompts generated together in each shard", at_least(1))
    normalize: bool = field_(True, "exact match ignores case, runs of whitespace and trailing punctuation")
    endpoint: str | None = field_(None, "a running server the eval tasks ask instead of loading the model: "
                                        "its URL (http://host:port/v1) or the run folder whose `slurmtune serve` "
                                        "is up (its key is read from there)")
    endpoint_model: str | None = field_(None, "the served model to ask at eval.endpoint; null: the endpoint's "
                                              "first model")
    endpoint_concurrency: int = field_(4, "requests each eval task keeps in flight at eval.endpoint", at_least(1))


@dataclass
class SlurmConfig:
    """Where and how jobs run. Site facts (partition, account, ...) live in slurm/ profiles."""

    cluster: str | None = field_(None, "cluster profile: a name in slurm/ (e.g. local-test) or a YAML path")
    executor: Literal["auto", "slurm", "local", "debug"] = field_(
        "auto", "auto: slurm when sbatch is on PATH and a cluster profile is chosen, else local (jobs run on "
                "this machine); debug: in this process")
    time_min: int = field_(60, "wall time of the train job, in minutes", at_least(1, "1 or more minutes"))
    gpus: int = field_(1, "GPUs per node for the train job (0: train on CPU)", at_least(0))
    cpus_per_gpu: int | None = field_(None, "CPU cores per GPU; null: the cluster profile's", at_least(1))
    mem_gb_per_gpu: int | None = field_(None, "memory per GPU in GB; null: the cluster profile's", at_least(1))


@dataclass
class DistributedConfig:
    """Training over several processes with DeepSpeed (see slurmtune.train.distributed)."""

    nodes: int = field_(1, "nodes the training processes are spread over", at_least(1))
    gpus_per_node: int = field_(1, "training processes per node: one per GPU (or CPU processes, with "
                                   "device cpu)", at_least(1))
    deepspeed: str | None = field_(None, "DeepSpeed config in manifests/deepspeed/; null: the shipped ZeRO-2 "
                                         "one", path=True)
    global_batch_size: int | None = field_(
        None, "samples per optimizer step over all processes; when set, batch_size x grad_accum x nodes x "
              "gpus_per_node must equal it (checked on the login node, which says the fix)", at_least(1))
    timeout_s: int = field_(
        300, "seconds a rendezvous or a collective may wait for the other ranks before the job fails: a dead "
             "or hung rank ends the job within about this, not at its time limit",
        at_least(10, "10 s or more (ranks start at different moments; loading a model takes a while)"))
    device: Literal["gpu", "cpu"] = field_(
        "gpu", "gpu: one task per GPU (--gres), NCCL. cpu: gpus_per_node counts CPU processes per node, no GPU "
               "is asked for or used, gloo (tests, CPU-only clusters)")


def _every_key_has_values(values: dict) -> bool:
    return all(isinstance(v, list) and v for v in values.values())


@dataclass
class SweepConfig:
    """Trials of a sweep (see slurmtune.runs.sweep); each factor given multiplies the others."""

    grid: dict[str, list[Any]] = field_({}, "dotted key -> values; every combination is a trial",
                                        Rule(lambda v, s: _every_key_has_values(v),
                                             "a non-empty list of values for each key"))
    paired: dict[str, list[Any]] = field_({}, "dotted key -> values; the lists are zipped (same length): row i "
                                              "is one trial", Rule(lambda v, s: _every_key_has_values(v),
                                                                   "a non-empty list of values for each key"))
    random: dict[str, dict[str, Any]] = field_({}, "dotted key -> {log_uniform|uniform|int_uniform: [lo, hi]} "
                                                   "or {choice: [...]}, drawn `samples` times")
    samples: int = field_(0, "random draws from `random`",
                          Rule(lambda v, s: v >= 1 if s.random else v >= 0,
                               "1 or more with sweep.random, else 0"))
    seed: int = field_(0, "seed of the random draws")
    trials: list[dict[str, Any]] = field_([], "explicit override sets, each a mapping of dotted key -> value")
    parallelism: int = field_(4, "trials running at once (%K of the array)", at_least(1))
    metric: str = field_("eval_loss", "what ranks the trials: eval_loss, train_loss, pass_rate, or a dotted "
                                      "path in eval_report.json", non_empty("a metric such as eval_loss"))
    mode: Literal["min", "max"] = field_("min", "min: the lowest metric is best; max: the highest")


@dataclass
class RunConfig:
    """A whole run: convert -> validate -> train -> eval -> report."""

    name: str = field_("run", "the run's name: its folders and SLURM job names start with it")
    description: str = field_("", "free text, kept with the run's resolved manifest")
    output_dir: str = field_("runs", "run folders are created here (relative to the working directory)")
    data: DataConfig = section(DataConfig)
    model: ModelConfig = section(ModelConfig)
    lora: LoraConfig = section(LoraConfig)
    train: TrainConfig = section(TrainConfig)
    vision: VisionConfig = section(VisionConfig)
    eval: EvalConfig = section(EvalConfig)
    slurm: SlurmConfig = section(SlurmConfig)
    distributed: DistributedConfig = section(DistributedConfig)
    sweep: SweepConfig = section(SweepConfig)


# --- loading --------------------------------------------------------------------------

def load_manifest(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML manifest, apply ``key.sub=value`` overrides, check every type. Values are
    checked apart (``value_problems``), with the paths and resources of what is submitted."""
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
    cfg = fill(RunConfig(), raw, problems, base=path.resolve().parent)
    apply_overrides(cfg, overrides, problems)
    if problems:
        raise ConfigError(problems, source=str(path))
    return cfg


def apply_overrides(cfg: RunConfig, overrides: list[str], problems: list[str], base: Path | None = None) -> None:
    """Set command-line ``key.sub=value`` texts on ``cfg``, each read by its field's type; relative
    paths resolve against ``base`` (default: the working directory, as the shell user expects)."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            problems.append(f"{override}: expected key.sub=value")
            continue
        set_value(cfg, key, text, problems, base=base or Path.cwd(), text=True)


def from_dict(raw: dict, base: Path | None = None) -> RunConfig:
    """Build a config from a plain dict (e.g. a resolved manifest saved in a run folder)."""
    problems: list[str] = []
    cfg = fill(RunConfig(), raw, problems, base=base)
    if problems:
        raise ConfigError(problems)
    return cfg


def apply_values(cfg: RunConfig, values: dict[str, Any], source: str = "overrides",
                 base: Path | None = None) -> RunConfig:
    """A copy of ``cfg`` with typed values set by dotted key (``{"train.lr": 2e-4}``: a sweep's
    trial), checked like a command-line override; relative paths resolve against ``base``."""
    cfg = copy.deepcopy(cfg)
    problems: list[str] = []
    for key, value in values.items():
        set_value(cfg, key, value, problems, base=base)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


# --- checking values ------------------------------------------------------------------

# --- explaining fields ----------------------------------------------------------------

# --- type checks ----------------------------------------------------------------------

