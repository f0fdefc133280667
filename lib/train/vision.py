"""The vision recipe's parts: what the text recipe (slurmtune.train.recipe) swaps in when the
model has a vision tower. Rows stay records until a batch is drawn; the collator encodes them
(slurmtune.data.vision: media decoded once into the run's frame cache, labels on the answer only)
and TRL's trainer takes the batch as it comes (``skip_prepare_dataset``).

::

    encoder = vision_encoder(cfg, run_dir)
    dataset = vision_dataset(data)                       # one column: each record as JSON, and where it is
    collator = VisionCollator(encoder, cfg.train.max_length, assistant_only=True)
    target_modules = language_model_targets(cfg.lora.target_modules)   # the vision tower stays frozen
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from slurmtune.config import RunConfig
from slurmtune.data.dataset import TrainRecords
from slurmtune.data.vision import VisionSettings, load_encoder, with_absolute_media
from slurmtune.errors import UsageError

FRAMES_DIR = "frames"  # in the run folder: every epoch and the eval read decoded frames from here


def vision_encoder(cfg: RunConfig, run_dir: Path):
    v = cfg.vision
    return load_encoder(cfg.model.path, VisionSettings(v.fps, v.max_frames, v.max_pixels), Path(run_dir) / FRAMES_DIR)


def vision_dataset(data: TrainRecords):
    from datasets import Dataset

    if data.kind != "chat":
        raise UsageError(f"{data.kind} records: the vision recipe trains on chat records (messages with image "
                         "and video parts); fix: convert the data to chat records")
    return Dataset.from_list([{"record": json.dumps(with_absolute_media(r, data.row(i))), "where": data.row(i)}
                              for i, r in enumerate(data.records, 1)])


class VisionCollator:
    """Records -> one padded batch of ids, labels and pixels (the model's own inputs).
    ``every_kind``: the media kinds each batch must hold (under ZeRO-3 every kind the run's rows
    have; a batch without one gets a phantom row of it, see the encoder's ``collate``)."""

    def __init__(self, encoder, max_length: int, assistant_only: bool = True, every_kind: tuple[str, ...] = ()):
        self.encoder, self.max_length, self.assistant_only = encoder, max_length, assistant_only
        self.every_kind = every_kind

    def __call__(self, features: list[dict]) -> dict:
        rows = [self.encoder.encode(json.loads(f["record"]), self.max_length, f["where"], self.assistant_only)
                for f in features]
        return self.encoder.collate(rows, every_kind=self.every_kind)


def trained_tokens(encoder, data: TrainRecords, max_length: int, assistant_only: bool = True) -> dict:
    """The first rows encoded as training will: tokens, and those that carry loss."""
    tokens = trained = 0
    for i, record in enumerate(data.records, 1):
        row = encoder.encode(with_absolute_media(record, data.row(i)), max_length, data.row(i), assistant_only)
        tokens += len(row["input_ids"])
        trained += sum(label != -100 for label in row["labels"])
    return {"rows": len(data.records), "tokens": tokens, "trained_tokens": trained,
            "trained_share": trained / max(1, tokens)}


def language_model_targets(modules: list[str], vision: list[str] = (), encoder=None) -> str:
    """A regex PEFT matches whole against module names: the named linear layers of the language
    model only (the vision tower has layers of the same names, e.g. its MLP's gate_proj), and the
    vision tower's or projector's layers when ``vision`` names them (``encoder.VISION_MODULES``)."""
    names = "|".join(re.escape(m) for m in modules)
    parts = [rf".*language_model\..*\.({names})"]
    parts += [rf".*{encoder.VISION_MODULES[v]}" for v in vision]
    return "|".join(f"({p})" for p in parts) if len(parts) > 1 else parts[0]
