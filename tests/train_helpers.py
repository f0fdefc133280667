"""Small data, configs and probes for tests/test_train.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from pathlib import Path

from slurmtune.config import RunConfig

TOPICS = ("pacing", "eye contact", "structure", "evidence")
SYSTEM = "You are a speech tutor."
STEP_LINE = re.compile(r" step (\d+)/\d+  loss (\S+)  lr (\S+)  grad_norm (\S+)")


def chat_rows(n: int) -> list[dict]:
    """n short tutoring chats; four distinct ones repeated, so a few steps lower the loss."""
    return [{"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"How was the {TOPICS[i % 4]} in my speech?"},
        {"role": "assistant", "content": f"Your {TOPICS[i % 4]} earned a {i % 4 + 2} out of 5."},
    ]} for i in range(n)]


def prompt_completion_rows(n: int) -> list[dict]:
    return [{"prompt": f"Tutor: rate the {TOPICS[i % 4]} of speech {i % 4}.\nAnswer:",
             "completion": f" a {i % 4 + 2} out of 5."} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def make_cfg(model_dir: Path, **train) -> RunConfig:
    """The tiny test run: batch 2 x 2 accumulation, 8 steps, a checkpoint every 2 steps."""
    cfg = RunConfig(name="tiny-test")
    cfg.model.path = str(model_dir)
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 8, 16, 0.05
    cfg.lora.target_modules = ["q_proj", "v_proj"]
    settings = dict(method="lora", max_steps=8, batch_size=2, grad_accum=2, lr=5e-3, warmup_ratio=0.0,
                    max_length=128, save_steps=2, keep_last=2, early_stopping_patience=3)
    settings.update(train)
    for key, value in settings.items():
        setattr(cfg.train, key, value)
    return cfg


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def step_lines(run_dir: Path) -> dict[int, tuple[str, ...]]:
    """step -> (loss, lr, grad_norm) as training.log printed them (the last attempt wins)."""
    lines = {}
    for line in (Path(run_dir) / "training.log").read_text(encoding="utf-8").splitlines():
        match = STEP_LINE.search(line)
        if match:
            lines[int(match.group(1))] = match.groups()[1:]
    return lines


def logged_losses(checkpoint: Path) -> dict[int, float]:
    """step -> training loss at full precision, from a checkpoint's trainer_state.json."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


class SignalOnLine:
    """A stdout that sends ``signal`` to this process when a line containing ``text`` is printed,
    the way SLURM's --signal lands while training writes its log."""

    def __init__(self, stream, text: str, sig=signal.SIGUSR2):
        self.stream, self.text, self.sig, self.fired = stream, text, sig, False

    def write(self, s: str) -> int:
        n = self.stream.write(s)
        if not self.fired and self.text in s:
            self.fired = True
            os.kill(os.getpid(), self.sig)
        return n

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False
