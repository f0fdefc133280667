"""The training recipe: canonical records -> a LoRA / QLoRA adapter, resumable step by step.

::

    stop = StopRequest()
    restore = install_signal_handlers(stop)      # SIGUSR2 / SIGTERM: checkpoint this step, then stop
    try:
        outcome = run_training(cfg, run_dir, ["data/train.jsonl"], "data/validation.jsonl", stop)
    finally:
        restore()
    outcome.status      # 'completed' (RUN_DIR/final/ written) or 'stopped' (requeue; it resumes)

    preflight(cfg, ["data/train.jsonl"])   # login node, tokenizer only, ~1 s after imports
    # {'rows': 16, 'tokens': 812, 'trained_tokens': 203, 'trained_share': 0.25, ...}

A run folder after a completed run::

    RUN_DIR/training_config.json   the resolved config (what a resume is compared with)
    RUN_DIR/training.log           one line per step: loss, lr, grad norm, tokens/s, elapsed
    RUN_DIR/runs/                  TensorBoard events, one folder per attempt
    RUN_DIR/checkpoints/step-NNNNNN/   the newest train.keep_last complete checkpoints
    RUN_DIR/final/                 adapter_config.json, adapter_model.safetensors, tokenizer
                                   files, lineage.json

The recipe has torchtune's shape: :class:`TrainingRecipe` validates in
``__init__``, then ``setup`` (resume decision, tokenizer, data, preflight,
model, trainer), ``train``, ``save_final`` and ``cleanup``.

Exact resume: a run stopped at step k and started again with the same run
folder ends with the same adapter bytes and the same logged losses as a run
never stopped. The checkpoint holds everything that decides the next step
(weights, optimizer, scheduler, RNG states, sampler position, early-stopping
counter), CPU runs use deterministic kernels and a single data-loading process,
and the Trainer skips the batches already trained in the current epoch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from slurmtune.train.checkpoints import (
    ADAPTER_FILE, CONFIG_FILE, SAMPLER_FILE, find_resume_checkpoint, layout_problem, read_json, read_marker,
    replace_dir, trainer_class, training_done,
)
from slurmtune.config import RunConfig
from slurmtune.schema import to_dict, value_problems
from slurmtune.errors import ConfigError, SlurmtuneError, UsageError
from slurmtune.data.jsonio import write_json_atomic
from slurmtune.data.dataset import (
    TrainRecords, count_trained_tokens, prepare_tokenizer, read_train_files, to_dataset,
)
from slurmtune.data.adapter_keys import adapter_names_problem
from slurmtune.data.vision import PROCESSOR_FILES, is_vision_model

FINAL_FILES_REMOVED = ("training_args.bin", "README.md")  # a pickle and an empty model card
# Keys that may change between attempts of one run without changing what is trained.
RESUME_IGNORED = ("slurm", "eval", "description", "output_dir", "train.resume",
                  "distributed.timeout_s", "distributed.global_batch_size", "train.gradient_checkpointing")
# The adapter's tensor shapes: a checkpoint cannot be loaded into an adapter built otherwise.
ADAPTER_SHAPE_KEYS = ("lora.r", "lora.target_modules", "lora.vision")


# --- stop requests ---------------------------------------------------------------------

@dataclass
class StopRequest:
    """Set by a signal handler; training checkpoints the current step and stops."""

    requested: bool = False
    reason: str = ""

    def set(self, reason: str) -> None:
        if not self.requested:
            self.requested, self.reason = True, reason


def install_signal_handlers(stop: StopRequest,
                            signals=(signal.SIGUSR2, signal.SIGTERM)) -> Callable[[], None]:
    """Route ``signals`` to ``stop`` (replacing e.g. submitit's USR2 handler); returns the undo."""
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handler(signum, frame):
        # Only a flag: the Trainer acts on it after the optimizer step in progress.
        stop.set(signal.Signals(signum).name)

    for sig in signals:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)

    return restore


@dataclass(frozen=True)
class TrainOutcome:
    status: Literal["completed", "stopped"]
    step: int
    final_dir: Path | None
    checkpoint: Path | None


# --- entry points ----------------------------------------------------------------------

def run_training(cfg: RunConfig, run_dir: Path, train_files: list[str], validation_file: str | None,
                 stop: StopRequest | None = None, *, conversion_summary: dict | None = None,
                 sbatch_script: str | None = None, deepspeed: str | None = None,
                 callbacks: tuple = ()) -> TrainOutcome:
    """Train (or continue) the adapter of ``run_dir``; 'stopped' means run it again to continue.
    ``conversion_summary`` (default: the convert step's summary.json beside the first training
    file) and ``sbatch_script`` go into final/lineage.json. ``deepspeed`` (a DeepSpeed JSON file)
    trains with DeepSpeed in the process group already joined (slurmtune.train.distributed);
    ``callbacks`` are extra TrainerCallbacks (e.g. per-rank heartbeats)."""
    recipe = TrainingRecipe(cfg, run_dir, train_files, validation_file, stop,
                            conversion_summary=conversion_summary, sbatch_script=sbatch_script,
                            deepspeed=deepspeed, callbacks=callbacks)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()


def preflight(cfg: RunConfig, train_files: list[str], n_rows: int = 16) -> dict:
    """Tokenize the first rows as training will and count the trained tokens (no model weights).
    Raises UsageError when nothing, or everything despite loss_on=assistant, would be trained."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    data = read_train_files(train_files, limit=n_rows)
    from slurmtune.train.tiny_model import ensure_model  # imports torch: only when asked

    ensure_model(cfg.model)
    tokenizer, template = prepare_tokenizer(cfg, data.kind)
    return count_trained_tokens(cfg, tokenizer, data, template)


# --- the recipe ------------------------------------------------------------------------

class TrainingRecipe:
    def __init__(self, cfg: RunConfig, run_dir: Path, train_files: list[str], validation_file: str | None,
                 stop: StopRequest | None = None, conversion_summary: dict | None = None,
                 sbatch_script: str | None = None, deepspeed: str | None = None, callbacks: tuple = ()):
        _validate(cfg)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.train_files = [str(Path(p).resolve()) for p in train_files]
        self.validation_file = str(Path(validation_file).resolve()) if validation_file else None
        self.stop = stop if stop is not None else StopRequest()
        self.conversion_summary = conversion_summary or _summary_beside(self.train_files[0])
        self.sbatch_script = sbatch_script
        self.deepspeed = str(deepspeed) if deepspeed else None
        self.extra_callbacks = list(callbacks)
        self.checkpoint_root = self.run_dir / "checkpoints"
        self.config = resolved_config(cfg, self.train_files, self.validation_file)
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.resume_from: Path | None = None
        self.forced_diff: list[str] = []  # config changes accepted by train.resume=force
        self.final_source: Path | None = None  # DeepSpeed: the checkpoint whose adapter final/ copies
        self.trainer = None
        self.vision = is_vision_model(cfg.model.path)  # a model with a vision tower: the vision recipe
        self.collator = None
        self.media_files: list[str] = []  # the images and videos a vision run's rows name (lineage)
        self.log: TrainingLog | None = None
        self._undo: list[Callable[[], None]] = []

    # setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"  # compute nodes are offline; fail fast instead of hanging
        self.resume_from = self._choose_resume()  # before any heavy work: a refusal takes a second
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = TrainingLog(self.run_dir / "training.log")
        self._undo.append(self.log.close)
        self.device = detect_device()
        self._undo += [_deterministic(self.device), _quiet_progress_bars()]
        data = read_train_files(self.train_files)
        from slurmtune.train.tiny_model import ensure_model

        ensure_model(self.cfg.model)
        self.data_files = data.files
        if self.vision:
            train_dataset, template, report = self._vision_data(data)
        else:
            self.tokenizer, template = prepare_tokenizer(self.cfg, data.kind)
            report = count_trained_tokens(self.cfg, self.tokenizer, TrainRecords(data.kind, data.records[:16]),
                                          template)
            train_dataset = to_dataset(data, self.tokenizer, self.cfg.train.loss_on, self.cfg.train.max_length)
        eval_dataset = self._validation_dataset(data.kind)
        write_json_atomic(self.run_dir / CONFIG_FILE, self.config)
        self.log.line(f"start: {len(data.records)} {data.kind} rows from {len(data.files)} file(s), "
                      f"method {self.cfg.train.method} on {self.device.name}, {template}; "
                      f"preflight: {report['trained_tokens']}/{report['tokens']} tokens trained "
                      f"({report['trained_share']:.0%}) in the first {report['rows']} rows")
        # Before the trainer: under ZeRO-3 its arguments make every model build a partitioned one.
        self.memory = memory_estimate(self.cfg, self.device, self.log)
        self.trainer = self._build_trainer(data.kind, train_dataset, eval_dataset)
        dropped = len(data.records) - len(self.trainer.train_dataset)
        if dropped > 0 and not self.cfg.train.packing:  # TRL drops rows truncation left untrained
            self.log.line(f"warning: {dropped} row(s) have no trained token within max_length "
                          f"{self.cfg.train.max_length} and are skipped")

    def _choose_resume(self) -> Path | None:
        mode = self.cfg.train.resume
        newest = find_resume_checkpoint(self.checkpoint_root)
        if newest is None:
            return None
        if mode == "never":
            raise UsageError(f"{self.run_dir} already holds checkpoints (newest: {newest.name}) and "
                             "train.resume=never starts fresh only in a run folder without any; fix: use a "
                             "new run folder, or train.resume=auto to continue (force if the config changed)")
        old = read_json(newest, CONFIG_FILE) if (newest / CONFIG_FILE).is_file() else {}
        diff = config_diff(old, self.config)
        if diff and mode != "force":
            lines = "\n  ".join(diff)
            raise UsageError(f"{newest} was trained with a different config:\n  {lines}\nfix: restore the "
                             "old values, use a new run folder, or set train.resume=force to continue with "
                             "the new ones")
        shape = [line for line in diff if line.split(":")[0] in ADAPTER_SHAPE_KEYS]
        if shape:
            raise UsageError(f"train.resume=force cannot continue {newest}: the adapter's shape changed "
                             f"({'; '.join(shape)}) and its weights would not fit; fix: restore the old values, "
                             "or use a new run folder")
        self._check_layout(newest)
        self.forced_diff = diff
        return newest

    def _check_layout(self, checkpoint: Path) -> None:
        """A multi-process checkpoint continues only in the same number of processes (and format)."""
        marker = read_marker(checkpoint) or {}
        world, fmt = self._layout()
        problem = layout_problem(marker, world, fmt)
        if problem:
            saved = marker.get("world_size", 1)
            raise UsageError(f"cannot continue {checkpoint}: {problem}; fix: run it again with "
                             f"distributed.nodes x distributed.gpus_per_node = {saved}"
                             + (f" and a ZeRO-{marker['format'][-1]} DeepSpeed file"
                                if str(marker.get("format", "")).startswith("deepspeed") else " without DeepSpeed")
                             + ", or use a new run folder")

    def _layout(self) -> tuple[int, str]:
        """(processes, checkpoint format) of this run, before the trainer exists."""
        from slurmtune.train.distributed import read_deepspeed_config, zero_stage

        world = int(os.environ.get("WORLD_SIZE", 1))
        if not self.deepspeed:
            return world, "torch"
        return world, f"deepspeed-zero{zero_stage(read_deepspeed_config(Path(self.deepspeed)))}"

    def _vision_data(self, data: TrainRecords):
        """(the dataset, a description, the preflight report) of the vision recipe."""
        from slurmtune.data.records import media_paths
        from slurmtune.data.vision import with_absolute_media
        from slurmtune.train.vision import VisionCollator, trained_tokens, vision_dataset, vision_encoder

        encoder = vision_encoder(self.cfg, self.run_dir)
        self.tokenizer = encoder.tokenizer
        assistant_only = self.cfg.train.loss_on == "assistant"
        media = [media_paths(with_absolute_media(r, data.row(n))) for n, r in enumerate(data.records, 1)]
        self.media_files = [path for row in media for _, path in row]
        # Under ZeRO-3 every rank must run the vision tower alike at every step (see VisionCollator).
        kinds = sorted({field.rsplit(".", 1)[-1] for row in media for field, _ in row})
        every_kind = tuple(kinds) if self._layout()[1] == "deepspeed-zero3" else ()
        self.collator = VisionCollator(encoder, self.cfg.train.max_length, assistant_only, every_kind)
        report = trained_tokens(encoder, TrainRecords(data.kind, data.records[:16], where=data.where[:16]),
                                self.cfg.train.max_length, assistant_only)
        return vision_dataset(data), "the model's vision chat template", report

    def _validation_dataset(self, kind: str):
        if not self.validation_file:
            return None
        data = read_train_files([self.validation_file])
        if data.kind != kind:
            raise UsageError(f"{self.validation_file}: {data.kind} records, but the training files hold "
                             f"{kind} records; fix: validate on the same kind of records")
        self.data_files = self.data_files + data.files
        if self.vision:
            from slurmtune.train.vision import vision_dataset
            return vision_dataset(data)
        return to_dataset(data, self.tokenizer, self.cfg.train.loss_on, self.cfg.train.max_length)

    def _build_trainer(self, kind: str, train_dataset, eval_dataset):
        from peft import LoraConfig
        from transformers import EarlyStoppingCallback

        lora = self.cfg.lora
        stop_callback, log_callback = _callbacks(self.stop, self.log)
        callbacks = [stop_callback, log_callback, *self.extra_callbacks]
        if eval_dataset is not None:
            callbacks.insert(0, EarlyStoppingCallback(early_stopping_patience=self.cfg.train.early_stopping_patience))
        # With DeepSpeed the arguments come first: under ZeRO-3 they make from_pretrained load each
        # weight straight into its rank's partition instead of a whole copy per process.
        args = sft_config(self.cfg, self.run_dir, self.device, kind, eval_dataset is not None, self.deepspeed) \
            if self.deepspeed else None
        targets = list(lora.target_modules)
        if self.vision:
            from slurmtune.train.vision import language_model_targets
            targets = language_model_targets(targets, lora.vision, self.collator.encoder)
        trainer = trainer_class()(
            model=load_model(self.cfg, self.device),
            args=args or sft_config(self.cfg, self.run_dir, self.device, kind, eval_dataset is not None),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=self.tokenizer,
            data_collator=self.collator,
            peft_config=LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                   target_modules=targets, task_type="CAUSAL_LM"),
            callbacks=callbacks,
            checkpoint_root=self.checkpoint_root,
            run_config=self.config,
            keep_last=self.cfg.train.keep_last,
        )
        stop_callback.trainer = trainer
        _console_callbacks(trainer)
        return trainer

    # train ------------------------------------------------------------------------------
    def train(self) -> TrainOutcome:
        trainer, resume = self.trainer, self.resume_from
        marker = read_marker(resume) if resume else None
        if resume is not None:
            self._log_resume(resume, marker)
        if trainer.args.world_size > 1 and _any_rank(self.stop.requested, trainer.args.device):
            self.stop.set(self.stop.reason or "stop requested on another rank")
        if self.stop.requested:
            # The signal came while loading (a short attempt on a busy node). Stopping now would
            # requeue with no progress, possibly forever; one optimizer step and its checkpoint
            # fit in the signal's lead time, so every attempt moves the run forward.
            self.log.line(f"stop requested ({self.stop.reason}) before training started: "
                          "training one step to save progress")
        if marker and self._finished(marker):
            self._load_finished(resume)
            done = True
        else:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            done = training_done(trainer) or not self.stop.requested
        newest = find_resume_checkpoint(self.checkpoint_root)
        step = trainer.state.global_step
        if not done:
            self.log.line(f"stop requested ({self.stop.reason}) at step {step}: saved {_rel(newest, self.run_dir)}; "
                          "run again with the same run folder to continue")
            return TrainOutcome("stopped", step, None, newest)
        final = self.save_final()
        self.log.line(f"training complete at step {step}: adapter in {_rel(final, self.run_dir)}")
        return TrainOutcome("completed", step, final, newest)

    def _log_resume(self, resume: Path, marker: dict) -> None:
        self.log.line(f"resuming from {_rel(resume, self.run_dir)} (step {marker['step']})")
        for line in self.forced_diff:
            self.log.line(f"train.resume=force: config changed since the checkpoint: {line}")
        sampler = read_json(resume, SAMPLER_FILE) if (resume / SAMPLER_FILE).is_file() else {}
        batches = -(-len(self.trainer.train_dataset) // self.cfg.train.batch_size)
        batches = -(-batches // self.trainer.args.world_size)  # each process draws every N-th batch
        if sampler.get("batches_per_epoch") not in (None, batches):
            self.log.line(f"warning: {batches} batches per epoch now, {sampler['batches_per_epoch']} at the "
                          "checkpoint: the data changed, so the data order does not continue exactly")

    def _finished(self, marker: dict) -> bool:
        """The checkpoint ends training; with a forced config change, by the new limits."""
        if not marker.get("done"):
            return False
        if not self.forced_diff:
            return True
        t = self.cfg.train
        return marker["step"] >= t.max_steps if t.max_steps > 0 else (marker["epoch"] or 0) >= t.epochs

    def _load_finished(self, checkpoint: Path) -> None:
        """The last checkpoint is already the end of training (killed before final/ was written)."""
        from transformers import TrainerState

        trainer = self.trainer
        if self.deepspeed:
            # No DeepSpeed engine exists before train() (under ZeRO-3 the weights are split across
            # ranks); the adapter files of the last (or best) checkpoint are exactly what
            # save_model would write now, so final/ copies them.
            trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
            best = trainer.state.best_model_checkpoint
            load_best = trainer.args.load_best_model_at_end and best and Path(best).is_dir()
            self.final_source = Path(best) if load_best else checkpoint
            return
        trainer._load_from_checkpoint(str(checkpoint))
        trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        best = trainer.state.best_model_checkpoint
        if trainer.args.load_best_model_at_end and best and Path(best).is_dir():
            trainer._load_best_model()

    # save -------------------------------------------------------------------------------
    def save_final(self) -> Path:
        from slurmtune.train.lineage import write_lineage

        trainer = self.trainer
        final = self.run_dir / "final"
        tmp = self.run_dir / f".final.tmp-{trainer.tmp_token}"
        if trainer.args.should_save:
            for stale in self.run_dir.glob(".final.*"):  # left by an attempt killed while saving
                shutil.rmtree(stale, ignore_errors=True)
        trainer.accelerator.wait_for_everyone()
        if self.final_source is not None:
            if trainer.args.should_save:
                tmp.mkdir(parents=True)
                for name in (ADAPTER_FILE, "adapter_config.json"):
                    shutil.copy2(self.final_source / name, tmp / name)
                self.tokenizer.save_pretrained(str(tmp))  # what save_model adds beside the adapter
        else:
            trainer.save_model(str(tmp))  # every rank: under ZeRO-3 the adapter is gathered from all
        if trainer.args.should_save:
            for name in FINAL_FILES_REMOVED:
                (tmp / name).unlink(missing_ok=True)
            for name in PROCESSOR_FILES if self.vision else ():  # the image processor and the media template
                if (Path(self.cfg.model.path) / name).is_file():
                    shutil.copy2(Path(self.cfg.model.path) / name, tmp / name)
            model = trainer.accelerator.unwrap_model(trainer.model).get_base_model()
            problem = adapter_names_problem(tmp, self.cfg.model.path, {n for n, _ in model.named_modules()})
            if problem:  # such an adapter would change nothing: never hand it on as final/
                raise SlurmtuneError(f"the trained adapter does not fit its own base: {problem}")
            write_lineage(tmp, self.config, [f.path for f in self.data_files], self.conversion_summary,
                          self.sbatch_script, seeds={"seed": self.cfg.train.seed, "data_seed": self.cfg.data.seed},
                          started_at=self.started_at, memory=self.memory.measured(self.log),
                          media=self.media_files)
            replace_dir(tmp, final)
        trainer.accelerator.wait_for_everyone()
        return final

    def cleanup(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


@dataclass
class MemoryRecord:
    """The train job's memory estimate, beside what the GPU allocated at its peak (lineage.json)."""

    estimate: object  # slurmtune.train.estimate.Memory
    cuda: bool

    def measured(self, log: "TrainingLog") -> dict:
        from slurmtune.train.estimate import size

        record = {"estimate_bytes": self.estimate.total, "estimate": dataclasses.asdict(self.estimate),
                  "peak_allocated_bytes": None}
        if self.cuda:
            import torch
            peak = torch.cuda.max_memory_allocated()
            record["peak_allocated_bytes"] = peak
            log.line(f"peak GPU memory {size(peak)} allocated, estimate {size(self.estimate.total)} "
                     f"(estimate / peak {self.estimate.total / max(peak, 1):.2f})")
        return record


def memory_estimate(cfg: RunConfig, device: "Device", log: "TrainingLog") -> MemoryRecord:
    """The estimate `run` printed, again on the node, logged; on a GPU, its peak counter reset."""
    from slurmtune.train.estimate import Setting, estimate_memory, model_shape

    memory = estimate_memory(model_shape(cfg), Setting.of(cfg, on_gpu=device.cuda))
    log.line(f"estimate: {memory.describe()} {'per GPU' if device.cuda else 'in memory (CPU)'}")
    if device.cuda:
        import torch
        torch.cuda.reset_peak_memory_stats()
    return MemoryRecord(memory, device.cuda)


def _summary_beside(data_file: str) -> dict | None:
    """The convert step writes summary.json next to train.jsonl; lineage wants its counts."""
    path = Path(data_file).with_name("summary.json")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "read" in summary else None


def _rel(path: Path | None, base: Path) -> str:
    if path is None:
        return "nothing"
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)


# --- config ----------------------------------------------------------------------------

def _validate(cfg: RunConfig) -> None:
    """Every problem of the settings at once, each with the key to fix (the checks the login
    node made before submitting: a recipe called directly makes them too)."""
    problems = value_problems(cfg)
    if problems:
        raise ConfigError(problems, source="train settings")


def resolved_config(cfg: RunConfig, train_files: list[str], validation_file: str | None) -> dict:
    """The config as trained: the files actually used replace the manifest's."""
    config = json.loads(json.dumps(to_dict(cfg)))
    config["data"]["train_files"] = list(train_files)
    config["data"]["validation_file"] = validation_file
    return config


def config_diff(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every trained-relevant key that differs. A key the old config
    lacks (a field added to the schema since) counts as its default, so upgrading slurmtune
    does not block a resume."""
    a, b = _flatten(_with_defaults(old)), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in RESUME_IGNORED):
            continue
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            lines.append(f"{key}: {_show(a.get(key, '<missing>'))} -> {_show(b.get(key, '<missing>'))}")
    return lines


def _with_defaults(raw: dict) -> dict:
    from slurmtune.config import RunConfig
    from slurmtune.schema import to_dict
    defaults = to_dict(RunConfig())

    def fill(value, default):
        if isinstance(value, dict) and isinstance(default, dict):
            return {**{k: v for k, v in default.items() if k not in value},
                    **{k: fill(v, default.get(k)) for k, v in value.items()}}
        return value
    return fill(raw, defaults) if raw else raw


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value) -> str:
    return value if value == "<missing>" else json.dumps(value)


# --- device, tokenizer, model ----------------------------------------------------------

@dataclass(frozen=True)
class Device:
    name: str  # 'cpu' or 'cuda:N'
    cuda: bool
    dtype: object  # torch dtype of the base weights / quantized compute
    index: object  # device_map target for quantized loading


def detect_device() -> Device:
    import torch

    if torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", 0))
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Device(f"cuda:{rank}", True, dtype, rank)
    return Device("cpu", False, torch.float32, "cpu")


def load_model(cfg: RunConfig, device: Device):
    """The base model for ``train.method``, ready for a LoRA adapter."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    method = cfg.train.method
    kwargs = {"local_files_only": True, "dtype": device.dtype,
              "attn_implementation": cfg.model.attn_implementation}
    if method in ("qlora", "lora-8bit"):
        kwargs["quantization_config"] = _quantization(method, device)
        kwargs["device_map"] = {"": device.index}  # bitsandbytes quantizes while placing the weights
    try:
        auto = AutoModelForImageTextToText if is_vision_model(cfg.model.path) else AutoModelForCausalLM
        model = auto.from_pretrained(cfg.model.path, **kwargs)
    except ImportError as e:
        raise UsageError(f"train.method={method}: {e}; fix: install bitsandbytes, or train.method=lora") from None
    if method in ("qlora", "lora-8bit"):
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model,
                                                use_gradient_checkpointing=checkpoints_activations(cfg, device.cuda))
    return model


def _quantization(method: str, device: Device):
    from transformers import BitsAndBytesConfig

    if method == "lora-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=device.dtype)


def sft_config(cfg: RunConfig, run_dir: Path, device: Device, kind: str, validation: bool,
               deepspeed: str | None = None):
    import torch
    from trl import SFTConfig

    t = cfg.train
    # Only multi-process runs pass these: single-process arguments stay exactly as they were.
    distributed = {"deepspeed": deepspeed, "ddp_timeout": cfg.distributed.timeout_s} if deepspeed else {}
    strategy = "epoch" if t.save_each_epoch else "steps"
    assistant = t.loss_on == "assistant"
    return SFTConfig(
        # HF writes TensorBoard events under output_dir/runs/; checkpoints go to checkpoints/ (ours).
        output_dir=str(run_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a share of the steps
        max_length=t.max_length,
        packing=t.packing,  # TRL's default 'bfd' packing is padding-free
        use_liger_kernel=t.kernels == "liger",  # the checks refused it on CPU and without liger-kernel
        # Chat rows come tokenized, their mask in `assistant_masks` (slurmtune.data.dataset.to_dataset),
        # which TRL turns into labels by itself; its assistant_only_loss wants `messages` rows (it raises
        # on tokenized ones) and would swap in a template of its own when the model's has no markers.
        assistant_only_loss=False,
        completion_only_loss=assistant and kind == "prompt-completion",
        seed=t.seed,
        data_seed=cfg.data.seed,
        save_strategy=strategy,
        save_steps=t.save_steps,
        eval_strategy=strategy if validation else "no",
        eval_steps=t.save_steps if validation and strategy == "steps" else None,
        load_best_model_at_end=validation,
        metric_for_best_model="eval_loss" if validation else None,
        greater_is_better=False if validation else None,
        restore_callback_states_from_checkpoint=True,  # the early-stopping counter survives a resume
        logging_strategy="steps", logging_steps=1, report_to=["tensorboard"],
        # transformers 5.23's name of gradient_checkpointing
        activation_checkpointing=checkpoints_activations(cfg, device.cuda),
        use_cpu=not device.cuda,
        bf16=device.dtype == torch.bfloat16,
        fp16=device.dtype == torch.float16,
        dataloader_num_workers=0,  # one process draws the data order: same order after a resume
        **_vision_args(cfg),
        dataloader_pin_memory=device.cuda,
        disable_tqdm=not sys.stdout.isatty(),
        **distributed,
    )


def _vision_args(cfg: RunConfig) -> dict:
    """Vision rows stay records until the collator encodes a batch (slurmtune.train.vision)."""
    if not is_vision_model(cfg.model.path):
        return {}
    return {"remove_unused_columns": False, "dataset_kwargs": {"skip_prepare_dataset": True}}


def checkpoints_activations(cfg: RunConfig, on_gpu: bool) -> bool:
    """train.gradient_checkpointing resolved: auto recomputes on GPUs, where it saves the memory
    that limits a run; on CPU it would only make small runs slower."""
    setting = cfg.train.gradient_checkpointing
    return on_gpu if setting == "auto" else setting == "on"


def _deterministic(device: Device) -> Callable[[], None]:
    """Deterministic CPU kernels while training (bit-identical resumes); returns the undo.

    Not the NaN fill of new tensors that comes with them: it only makes reads of uninitialised
    memory visible, which correct kernels never make, and TRL's LM head allocates a 4096 x 32768
    tile each step, whose fill alone took a fifth of a tiny model's step time."""
    import torch

    if device.cuda:
        return lambda: None
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False

    def undo() -> None:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]

    return undo


def _quiet_progress_bars() -> Callable[[], None]:
    """In a batch log, datasets' and transformers' bars are noise; training.log lines say it all."""
    if sys.stdout.isatty():
        return lambda: None
    import datasets
    from transformers.utils import logging as hf_logging

    before = (datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled())
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()

    def undo() -> None:
        if before[0]:
            datasets.enable_progress_bars()
        if before[1]:
            hf_logging.enable_progress_bar()

    return undo


# --- log lines and callbacks ---------------------------------------------------------

class TrainingLog:
    """RUN_DIR/training.log, appended across attempts; every line also goes to stdout (the SLURM log)."""

    def __init__(self, path: Path):
        # One writer: in a multi-process run the other ranks' lines would only repeat rank 0's.
        self.enabled = int(os.environ.get("RANK", 0)) == 0
        self.file = open(path, "a", encoding="utf-8") if self.enabled else None
        self.tty = sys.stdout.isatty()

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        self.file.write(stamped + "\n")
        self.file.flush()
        if self.tty:
            from tqdm import tqdm
            tqdm.write(stamped)  # above the progress bar, not through it
        else:
            print(stamped, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def format_step(logs: dict, step: int, max_steps: int, tokens_per_s: float | None, elapsed_s: float) -> str:
    parts = [f"step {step}/{max_steps}", f"loss {logs['loss']:.6f}", f"lr {logs.get('learning_rate', 0.0):.3e}"]
    if logs.get("grad_norm") is not None:
        parts.append(f"grad_norm {logs['grad_norm']:.4f}")
    if tokens_per_s is not None:
        parts.append(f"tok/s {tokens_per_s:.0f}")
    parts.append(f"elapsed {elapsed_s:.1f}s")
    return "  ".join(parts)


def _fault_step_pause_s() -> float:
    """Fault injection for the time-limit test: SLURMTUNE_FAULT_STEP_PAUSE_S holds every step of
    a job's first attempt that long, so it outlasts its limit on any machine. Unset in real runs."""
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0):
        return 0.0
    return float(os.environ.get("SLURMTUNE_FAULT_STEP_PAUSE_S") or 0)


def _callbacks(stop: StopRequest, log: TrainingLog) -> list:
    """Our TrainerCallbacks. Long because both classes close over ``stop`` and ``log`` and are
    defined here, in a function, so that importing this module does not import transformers."""
    from transformers import TrainerCallback
    pause_s = _fault_step_pause_s()

    class StopOnRequest(TrainerCallback):
        """After the optimizer step during which a stop was requested: save that step, stop."""

        trainer = None

        def on_step_end(self, args, state, control, **kwargs):
            if pause_s:
                time.sleep(pause_s)
            if args.world_size > 1 and _any_rank(stop.requested, args.device):
                stop.set(stop.reason or "stop requested on another rank")
            if stop.requested:
                control.should_save = True
                control.should_training_stop = True
                if self.trainer is not None:
                    self.trainer.skip_best_model_load = True
            return control

        def on_epoch_end(self, args, state, control, **kwargs):
            # A stop breaks out mid-epoch; HF would still run its end-of-epoch evaluation and save,
            # which an uninterrupted run never does there. At a real epoch end they stay.
            if stop.requested and abs(state.epoch - round(state.epoch)) > 1e-9:
                control.should_save = control.should_evaluate = control.should_log = False
            return control

    class LogLines(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = self.last_time = time.monotonic()
            seen = [h["num_tokens"] for h in state.log_history if "num_tokens" in h]
            self.last_tokens = seen[-1] if seen else 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if "loss" in logs:
                log.line(format_step(logs, state.global_step, state.max_steps, self._rate(logs),
                                     time.monotonic() - self.start))
            elif "eval_loss" in logs:
                log.line(f"step {state.global_step}/{state.max_steps}  eval_loss {logs['eval_loss']:.6f}")
            elif "train_runtime" in logs:
                log.line(f"this attempt trained up to step {state.global_step} in {logs['train_runtime']:.1f}s")

        def _rate(self, logs: dict) -> float | None:
            """Tokens per second since the previous line (TRL logs a running token count)."""
            now, tokens = time.monotonic(), logs.get("num_tokens")
            rate = None
            if tokens is not None and self.last_tokens is not None and now > self.last_time:
                rate = (tokens - self.last_tokens) / (now - self.last_time)
            self.last_time, self.last_tokens = now, tokens
            return rate

    return [StopOnRequest(), LogLines()]


def _any_rank(flag: bool, device) -> bool:
    """Whether any process saw the signal: all ranks must stop after the same step, or the
    ones that go on wait forever in the next step's gradient all-reduce."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _console_callbacks(trainer) -> None:
    """Our log lines replace HF's printed dicts; a tqdm bar only on a terminal."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    if sys.stdout.isatty():
        trainer.remove_callback(ProgressCallback)

        class QuietProgress(ProgressCallback):
            def on_log(self, *args, **kwargs):  # the bar only; the lines come from TrainingLog
                pass

        trainer.add_callback(QuietProgress())
