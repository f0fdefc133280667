"""Atomic, resumable checkpoints in ``RUN_DIR/checkpoints/step-NNNNNN/``.

::

    root = run_dir / "checkpoints"
    write_checkpoint(root, step=40, epoch=1.25, fill=save_into)  # -> root / "step-000040"
    find_resume_checkpoint(root)        # newest complete checkpoint, or None (a fresh start)
    prune(root, keep_last=2)            # the two newest complete ones stay

    Trainer = trainer_class()           # TRL's SFTTrainer, saving in this layout
    trainer = Trainer(model=..., args=..., checkpoint_root=root, run_config=cfg_dict, keep_last=2)

A checkpoint is built in a hidden sibling (``.step-000040.tmp-PID``), every file
is fsynced, then the ``COMPLETE`` marker is written last and the folder renamed
into place, so a job killed at any moment leaves either a whole checkpoint or
none under a ``step-`` name. The marker (JSON: step, epoch, time, sha256 of the
adapter, the name and size of every file, and ``done`` when nothing is left to
train) is checked before a resume: a folder without it, with a file the marker
does not list (so written after it) or a file of another size, or an adapter
whose hash differs, is ignored. Sizes rather than modification times decide
"written after the marker": ``cp -r`` of a run folder rewrites every mtime.

Hugging Face's Trainer writes ``checkpoint-N`` in place, file after file; the
subclass from :func:`trainer_class` replaces that save with the layout above and
keeps everything an exact resume needs: adapter weights, optimizer, scheduler,
python/numpy/torch RNG states of every process, ``trainer_state.json`` (log
history, best metric, early-stopping counter), ``sampler_state.json`` (where in
which epoch the data order stands) and ``training_config.json`` (the resolved
run config, compared before resuming).

Several processes (DeepSpeed ZeRO) write one checkpoint together: each rank
fills the same tmp folder with its own shard (``global_stepN/zero_pp_rank_R_*``,
``rng_state_R.pth``), and rank 0 seals it only once every rank's files are
there. The marker then also records the layout (``world_size``, ``format``
such as ``deepspeed-zero3``); a checkpoint whose listed files lack a rank's
shard never counts, and :func:`layout_problem` says why a run with another
layout cannot continue from it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

STEP_RE = re.compile(r"^step-(\d{6,})$")
TMP_RE = re.compile(r"^\.step-\d{6,}\.(tmp|old)-(\d+)$")
MARKER = "COMPLETE"
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "training_config.json"
SAMPLER_FILE = "sampler_state.json"
TRAINER_STATE_FILE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def step_of(path: Path) -> int | None:
    match = STEP_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


# --- writing ---------------------------------------------------------------------------

def write_checkpoint(root: Path, step: int, epoch: float | None, fill: Callable[[Path], None],
                     extra: dict | None = None, token: int | None = None, writer: bool = True,
                     barrier: Callable[[], None] = lambda: None,
                     missing: Callable[[Path], list[str]] | None = None) -> Path:
    """Build ``root/step-NNNNNN`` atomically: ``fill(tmp)`` writes the files, then fsync,
    marker last, rename. In a multi-process run every rank calls this with rank 0's
    ``token`` (the tmp folder's suffix) and only the ``writer`` rank seals it, after
    ``missing(tmp)`` (the files some rank should have written) came back empty."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-{token if token is not None else os.getpid()}"
    if writer:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    fill(tmp)
    barrier()
    if writer:
        absent = missing(tmp) if missing else []
        if absent:  # never seal a checkpoint some rank did not finish: resuming from it would fail
            raise RuntimeError(f"checkpoint {final.name} left unsealed: missing {', '.join(absent)}")
        _fsync_tree(tmp)
        _fault_pause(root, tmp)
        marker = {"step": step, "epoch": epoch, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "sha256": _sha256(tmp / ADAPTER_FILE), "files": _file_sizes(tmp), **(extra or {})}
        _write_synced(tmp / MARKER, json.dumps(marker, indent=2) + "\n")
        _fsync_dir(tmp)
        replace_dir(tmp, final)
    barrier()
    return final


def _fault_pause(root: Path, tmp: Path) -> None:
    """Fault injection for the resume tests: with SLURMTUNE_FAULT_CHECKPOINT_PAUSE_S set, hold
    every checkpoint after the first half-written (files there, no marker yet) for that long,
    so a test can SIGKILL the job at exactly that moment. Unset in real runs."""
    pause = float(os.environ.get("SLURMTUNE_FAULT_CHECKPOINT_PAUSE_S") or 0)
    if pause and complete_checkpoints(root):
        print(f"fault injection: {tmp.name} half-written, pausing {pause:g} s", flush=True)
        time.sleep(pause)


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is swapped out first, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _file_sizes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*"), reverse=True):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            _fsync_dir(p)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- reading ---------------------------------------------------------------------------

def read_marker(folder: Path) -> dict | None:
    """The marker of a complete checkpoint, or None when the folder is not one."""
    folder = Path(folder)
    step = step_of(folder)
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if step is None or not isinstance(marker, dict) or marker.get("step") != step:
        return None
    files = marker.get("files")
    # Listed files only, at their listed sizes: anything written after the marker breaks this.
    if not isinstance(files, dict) or _file_sizes(folder) != files:
        return None
    if marker.get("sha256") is None or _sha256(folder / ADAPTER_FILE) != marker["sha256"]:
        return None
    if "world_size" in marker and missing_rank_files(files, marker):
        return None  # sealed without some rank's shard: not a checkpoint anyone can resume from
    return marker


# --- multi-process layouts -------------------------------------------------------------

def missing_rank_files(names, layout: dict) -> list[str]:
    """The per-rank files of ``layout`` ({world_size, format}) absent from ``names`` (paths
    relative to the checkpoint). DeepSpeed writes its shards under ``global_stepN/``; the
    ``mp_rank_00`` in their names assumes no tensor parallelism, which slurmtune never uses."""
    names, world, fmt = set(names), int(layout.get("world_size", 1)), layout.get("format", "torch")
    expected = [f"rng_state_{r}.pth" for r in range(world)] if world > 1 else []
    if fmt.startswith("deepspeed"):
        tags = sorted({n.split("/")[0] for n in names if n.startswith("global_step") and "/" in n})
        if len(tags) != 1:
            return expected + ["global_stepN/ (DeepSpeed's shards)"]
        shards = ("optim_states", "model_states") if fmt == "deepspeed-zero3" else ("optim_states",)
        expected += [f"{tags[0]}/zero_pp_rank_{r}_mp_rank_00_{kind}.pt" for r in range(world) for kind in shards]
        expected += ["latest"] + ([f"{tags[0]}/mp_rank_00_model_states.pt"] if fmt != "deepspeed-zero3" else [])
    return [name for name in expected if name not in names]


def layout_problem(marker: dict, world_size: int, fmt: str) -> str | None:
    """Why a run of ``world_size`` processes saving ``fmt`` cannot continue from ``marker``'s
    checkpoint, or None. No format here allows a change: ZeRO splits the optimizer state into
    one shard per rank and DeepSpeed loads those only into as many ranks with the same stage
    (re-splitting needs an offline conversion to a universal checkpoint, which slurmtune does not
    do); a single-process checkpoint holds one optimizer.pt that DeepSpeed cannot load."""
    saved = (int(marker.get("world_size", 1)), marker.get("format", "torch"))
    if saved == (world_size, fmt):
        return None
    return (f"it was saved by {_layout_name(*saved)} and this run has {_layout_name(world_size, fmt)}; "
            "the optimizer state is stored per process (one shard per rank with ZeRO) and loads only into "
            "the same number of processes with the same format")


def _layout_name(world_size: int, fmt: str) -> str:
    kind = {"torch": "plain PyTorch", "deepspeed-zero2": "DeepSpeed ZeRO-2",
            "deepspeed-zero3": "DeepSpeed ZeRO-3"}.get(fmt, fmt)
    return f"{world_size} process{'es' if world_size != 1 else ''} ({kind})"


def trainer_layout(trainer) -> dict:
    """{world_size, format} of a multi-process or DeepSpeed trainer; {} for one plain process,
    whose markers keep their original fields."""
    if not trainer.is_deepspeed_enabled and trainer.args.world_size <= 1:
        return {}
    fmt = f"deepspeed-zero{trainer.accelerator.state.deepspeed_plugin.zero_stage}" \
        if trainer.is_deepspeed_enabled else "torch"
    return {"world_size": trainer.args.world_size, "format": fmt}


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    folders = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)
    return [p for p in folders if read_marker(p) is not None]


def find_resume_checkpoint(root: Path) -> Path | None:
    """The newest complete ``step-NNNNNN`` folder; tmp folders and unsealed ones never count."""
    root = Path(root)
    if not root.is_dir():
        return None
    folders = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None),
                     key=step_of, reverse=True)
    # Newest first, so only the candidate that wins is hashed in the usual case.
    return next((p for p in folders if read_marker(p) is not None), None)


def prune(root: Path, keep_last: int, protect: tuple = ()) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints (and ``protect``, e.g. the
    best one), plus leftovers of dead writers. Called only after a new checkpoint is sealed,
    so the one a run resumed from goes only once a newer complete one exists."""
    root = Path(root)
    keep_last = max(1, keep_last)
    complete = complete_checkpoints(root)
    keep = set(complete[-keep_last:]) | {Path(p) for p in protect if p}
    removed = [p for p in complete if p not in keep]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir() if root.is_dir() else ():
        match = TMP_RE.match(p.name)
        if match and int(match.group(2)) != os.getpid():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def read_json(folder: Path, name: str) -> dict:
    return json.loads((Path(folder) / name).read_text(encoding="utf-8"))


# --- the Trainer side ------------------------------------------------------------------

def training_done(trainer) -> bool:
    """Whether the run has nothing left to train: max steps reached or patience used up."""
    state = trainer.state
    if state.max_steps and state.global_step >= state.max_steps:
        return True
    for cb in trainer.callback_handler.callbacks:
        patience = getattr(cb, "early_stopping_patience", None)
        if patience is not None and cb.early_stopping_patience_counter >= patience:
            return True
    return False


def sampler_position(trainer) -> dict:
    """Where the data order stands; HF skips exactly these batches when it resumes."""
    loader = trainer.callback_handler.train_dataloader
    batches = len(loader) if loader is not None else None
    accum = trainer.args.gradient_accumulation_steps
    steps_per_epoch = max(1, -(-batches // accum)) if batches else None
    step = trainer.state.global_step
    return {
        "global_step": step,
        "epoch": step // steps_per_epoch if steps_per_epoch else None,
        "batches_done_in_epoch": (step % steps_per_epoch) * accum if steps_per_epoch else None,
        "batches_per_epoch": batches,
        "data_seed": trainer.args.data_seed,
        "seed": trainer.args.seed,
    }


def save_trainer_checkpoint(trainer) -> Path:
    """What ``Trainer._save_checkpoint`` saves, in the atomic step-NNNNNN layout."""
    args, state = trainer.args, trainer.state
    root, step = trainer.checkpoint_root, state.global_step
    trainer.store_flos()
    best = _best_checkpoint(trainer, root, step)
    if best is not None:
        state.best_model_checkpoint = str(best)

    def fill(tmp: Path) -> None:
        out = str(tmp)
        trainer.save_model(out, _internal_call=True)
        if not args.save_only_model:
            trainer._save_optimizer_and_scheduler(out)
            trainer._save_scaler(out)
            trainer._save_rng_state(out)  # python, numpy, torch (and cuda) of this process
        if args.should_save:
            _export_callback_states(trainer)
            state.save_to_json(os.path.join(out, TRAINER_STATE_FILE))
            _write_json(tmp / CONFIG_FILE, trainer.run_config)
            _write_json(tmp / SAMPLER_FILE, sampler_position(trainer))

    layout = trainer_layout(trainer)
    path = write_checkpoint(root, step, state.epoch, fill, extra={"done": training_done(trainer), **layout},
                            token=trainer.tmp_token, writer=args.should_save,
                            barrier=trainer.accelerator.wait_for_everyone,
                            missing=(lambda tmp: missing_rank_files(_file_sizes(tmp), layout)) if layout else None)
    if args.should_save:
        prune(root, trainer.keep_last, protect=(best,))
    return path


def _best_checkpoint(trainer, root: Path, step: int) -> Path | None:
    """HF's rule (the best step's folder, once it exists) for our folder names."""
    best_step = trainer.state.best_global_step
    if not best_step:
        return None
    best = root / step_dir_name(best_step)
    return best if best_step == step or best.is_dir() else None


def _export_callback_states(trainer) -> None:
    """Early-stopping counters and TrainerControl go into trainer_state.json, as HF does."""
    from transformers.trainer_callback import ExportableState

    for cb in trainer.callback_handler.callbacks + [trainer.control]:
        if isinstance(cb, ExportableState):
            name = cb.__class__.__name__
            if isinstance(trainer.state.stateful_callbacks.get(name), list):
                trainer.state.stateful_callbacks[name].append(cb.state())
            else:
                trainer.state.stateful_callbacks[name] = cb.state()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


@functools.cache
def trainer_class():
    """TRL's SFTTrainer with atomic step-NNNNNN checkpoints (TRL is imported on first call)."""
    from trl import SFTTrainer

    class StepCheckpointTrainer(SFTTrainer):
        def __init__(self, *args, checkpoint_root: Path, run_config: dict, keep_last: int, **kwargs):
            self.checkpoint_root = Path(checkpoint_root)
            self.run_config = run_config
            self.keep_last = keep_last
            self.skip_best_model_load = False  # set when a stop request ends training early
            super().__init__(*args, **kwargs)
            self.tmp_token = _shared_token(self)

        def _save_checkpoint(self, model, trial):
            self.last_checkpoint = save_trainer_checkpoint(self)

        def _load_best_model(self):
            # A stopped run comes back; loading the best weights now would only spend grace time.
            if not self.skip_best_model_load:
                super()._load_best_model()

        def _init_training_state(self, *args, **kwargs):
            result = super()._init_training_state(*args, **kwargs)
            # TRL counts trained tokens in the process; carry the count over a resume so logs match.
            seen = [h["num_tokens"] for h in self.state.log_history if "num_tokens" in h]
            self._total_train_tokens = int(seen[-1]) if seen else 0
            return result

    return StepCheckpointTrainer


def _shared_token(trainer) -> int:
    """Rank 0's PID: every rank must fill the same tmp folder."""
    if trainer.args.world_size <= 1:
        return os.getpid()
    from accelerate.utils import broadcast_object_list

    box = [os.getpid()]
    broadcast_object_list(box, from_process=0)
    return box[0]
