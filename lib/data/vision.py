"""Chat records with images and videos, as a vision-language model takes them: one way for
training, evaluation and serving.

::

    if is_vision_model("models/qwen2.5-vl-7b"):
        encoder = load_encoder("models/qwen2.5-vl-7b", VisionSettings(fps=2.0, max_frames=16,
                                                                     max_pixels=200_704), cache_dir="runs/r1/frames")
        row = encoder.encode(record, max_length=4096)   # input_ids, labels, pixel_values, image_grid_thw, ...
        batch = encoder.collate([row, ...])             # padded tensors for model(**batch)
        encoder.count(record)                           # tokens the row will take, from the files' sizes alone

Two families: Qwen2-VL / Qwen2.5-VL (images and video, ``QwenVLEncoder``) and Mistral3 such as
Mistral-Small-3.1 (images, a Pixtral tower, ``PixtralEncoder``). The chat template renders each
image or video part as its placeholder (Qwen2.5-VL: ``<|vision_start|><|image_pad|><|vision_end|>``,
Mistral3: ``[IMG]``); the assistant's tokens are found from the template's own renderings
(slurmtune.data.templates.assistant_mask), then each placeholder is expanded to its media's tokens
(Qwen: one per merged patch; Mistral3: one ``[IMG]`` per merged patch, each row of them closed by
``[IMG_BREAK]``, the last by ``[IMG_END]``). Labels are the token ids on each assistant
turn's content and end-of-turn token and -100 everywhere else: prompts, placeholders and
padding never carry loss. A row longer than ``max_length`` is an error with its numbers, never
cut: a cut through an image's tokens leaves the model fewer placeholders than image features.

Images are sized by Pillow within ``max_pixels`` and made patches by the model's own image
processor (transformers' Pillow backend). transformers' video processors need torchvision, which
has no CPU build for torch 2.13 here, so frames (slurmtune.data.media: sampled at ``fps``, cached)
are made patches here, in the video processor's layout: pairs of frames form one temporal patch,
and ``second_per_grid_ts`` carries the sampled rate to the model's temporal positions. The layout
is tested against the image processor (two identical frames are that image).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slurmtune.data.context import with_context
from slurmtune.data.media import FrameCache, fit_pixels, load_image, probe, sample_times
from slurmtune.data.records import PART_TYPES
from slurmtune.errors import DataError, UsageError

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
PIXTRAL_FAMILIES = ("mistral3",)
# Beside a vision model's weights: its image processor, processor and media chat template (an
# adapter and a merged model carry them too).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json")
IGNORE = -100


def model_type(model_dir: str | Path) -> str | None:
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get("model_type")


def is_vision_model(model_dir: str | Path) -> bool:
    """Whether the model folder holds a vision-language model (its config has a vision tower)."""
    config = Path(model_dir) / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class VisionSettings:
    fps: float = 2.0
    max_frames: int = 16
    max_pixels: int = 448 * 448


def load_encoder(model_dir: str | Path, settings: VisionSettings, cache_dir: str | Path | None) -> "VisionEncoder":
    """The encoder of the model's family; ``cache_dir`` holds decoded frames (None: count only)."""
    kind = model_type(model_dir)
    if kind in QWEN_FAMILIES:
        return QwenVLEncoder(model_dir, settings, cache_dir)
    if kind in PIXTRAL_FAMILIES:
        return PixtralEncoder(model_dir, settings, cache_dir)
    raise UsageError(f"{model_dir}: vision-language model type {kind!r} has no recipe yet; "
                     f"expected one of {', '.join(QWEN_FAMILIES + PIXTRAL_FAMILIES)}")


def template_messages(messages: list[dict]) -> list[dict]:
    """Turns as a vision template takes them: media parts kept in place, passages opening their
    user turn, an assistant's content as its text."""
    out = []
    for m in messages:
        content = m.get("content")
        if m.get("role") == "assistant" and isinstance(content, list):
            content = "\n".join(p.get("text", "") for p in content if p.get("type") == "text")
        if m.get("context"):
            if isinstance(content, list):
                content = [{"type": "text", "text": with_context("", m["context"]).rstrip()}, *content]
            else:
                content = with_context(content or "", m["context"])
        out.append({"role": m["role"], "content": content})
    return out


def media_parts(messages: list[dict]) -> list[tuple[str, str]]:
    """(kind, path) of every image and video part, in the order the template renders them."""
    found = []
    for m in messages:
        if isinstance(m.get("content"), list):
            found += [(p["type"], p[PART_TYPES[p["type"]]]) for p in m["content"]
                      if isinstance(p, dict) and p.get("type") in ("image", "video")]
    return found


def with_absolute_media(record: dict, where: str) -> dict:
    """``record`` with relative image/video paths made absolute against the folder of the file
    it came from (``where``: "file:line"), as `validate --check-paths` reads them."""
    folder = Path(where.rsplit(":", 1)[0]).parent
    messages = []
    for m in record["messages"]:
        content = m.get("content")
        if isinstance(content, list):
            content = [{**part, PART_TYPES[part["type"]]: str(folder / part[PART_TYPES[part["type"]]])}
                       if isinstance(part, dict) and part.get("type") in ("image", "video")
                       and isinstance(part.get(PART_TYPES[part["type"]]), str)
                       and not Path(part[PART_TYPES[part["type"]]]).is_absolute() else part
                       for part in content]
        messages.append({**m, "content": content})
    return {**record, "messages": messages}


class RowTooLong(DataError):
    pass


class VisionEncoder:
    """What every family shares: its template and tokenizer, labels on the answer only, each media
    placeholder expanded to the tokens of its media, rows refused rather than cut, batches padded.
    A family says how its placeholders expand (``expanded``), how many tokens a file takes
    (``media_tokens``), its pixels (``_image``, ``_video``) and how they batch (``batch_media``)."""

    PLACEHOLDERS: dict[str, str] = {}  # media kind -> the token its template renders for one part
    VISION_MODULES: dict[str, str] = {}  # lora.vision -> regex over the vision side's linear layers

    def __init__(self, model_dir: str | Path, settings: VisionSettings, cache_dir: str | Path | None):
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        self.settings = settings
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        template_file = model_dir / "chat_template.json"
        if template_file.is_file():  # the processor's template (media placeholders) over the tokenizer's
            self.tokenizer.chat_template = json.loads(template_file.read_text(encoding="utf-8"))["chat_template"]
        self.placeholder_ids = {self.tokenizer.convert_tokens_to_ids(token): kind
                                for kind, token in self.PLACEHOLDERS.items()}
        self.cache = FrameCache(cache_dir) if cache_dir is not None else None
        self._probed: dict = {}

    def with_settings(self, settings: VisionSettings) -> "VisionEncoder":
        """This encoder sizing media by other settings (the tokenizer and files probed shared)."""
        other = copy.copy(self)
        other.settings = settings
        return other

    def _probe(self, path: str, kind: str):
        """The file's size and length (slurmtune.data.media.probe), opened once per encoder."""
        if (path, kind) not in self._probed:
            self._probed[(path, kind)] = probe(path, kind)
        return self._probed[(path, kind)]

    # --- tokens --------------------------------------------------------------------------
    def encode(self, record: dict, max_length: int | None = None, where: str = "row",
               assistant_only: bool = True) -> dict:
        """The model's inputs and labels for one chat record (``assistant_only=False``: every text
        token carries loss, the media placeholders and padding still none)."""
        from slurmtune.data.templates import assistant_mask

        messages = template_messages(record["messages"])
        self._refuse_unsupported(messages, where)
        turn = assistant_mask(self.tokenizer, messages)
        mask = [bool(m) or not assistant_only for m in turn.mask]
        ids, labels, media = self._expand(turn.ids, mask, messages, where)
        if max_length and len(ids) > max_length:
            raise RowTooLong(where, None, self._too_long(len(ids), sum(m["tokens"] for m in media), max_length))
        return {"input_ids": ids, "labels": labels, "media": media}

    def prompt(self, messages: list[dict], where: str = "row") -> dict:
        """The inputs a model answers from: ``messages`` and the assistant's opening (for generation)."""
        messages = template_messages(messages)
        self._refuse_unsupported(messages, where)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        ids, _, media = self._expand(ids, [False] * len(ids), messages, where)
        return {"input_ids": ids, "labels": [IGNORE] * len(ids), "media": media}

    def _expand(self, ids: list[int], mask: list[bool], messages: list[dict], where: str):
        """Each media placeholder expanded to its media's tokens (never trained)."""
        media = [self._image(path) if kind == "image" else self._video(path) for kind, path in media_parts(messages)]
        out, labels, used = [], [], 0
        for token, trained in zip(ids, mask):
            if token in self.placeholder_ids and used < len(media):
                expanded = self.expanded(token, media[used])
                out += expanded
                labels += [IGNORE] * len(expanded)
                used += 1
                continue
            out.append(token)
            labels.append(token if trained else IGNORE)
        if used != len(media):
            raise DataError(where, None, f"the chat template rendered {used} media placeholders for "
                                         f"{len(media)} image/video parts")
        return out, labels, media

    def count(self, record: dict, where: str = "row") -> tuple[int, int, int]:
        """(all tokens, media tokens, trained tokens) of a row, from the media files' sizes and
        lengths alone (nothing decoded: the login node counts every row in seconds)."""
        from slurmtune.data.templates import assistant_mask

        messages = template_messages(record["messages"])
        self._refuse_unsupported(messages, where)
        turn = assistant_mask(self.tokenizer, messages)
        parts = media_parts(messages)
        tokens = sum(self.media_tokens(kind, path) for kind, path in parts)
        return len(turn.ids) - len(parts) + tokens, tokens, sum(turn.mask)

    def too_long(self, total: int, media: int, max_length: int) -> str:
        return self._too_long(total, media, max_length)

    def _too_long(self, total: int, media: int, max_length: int) -> str:
        s = self.settings
        return (f"{total} tokens ({media} of them images/video) over train.max_length {max_length}; a cut row "
                f"would lose its answer or split an image's tokens; fix: train.max_length={total}, or fewer "
                f"tokens per frame/image (vision.max_pixels, now {s.max_pixels}) or frames (vision.max_frames, "
                f"now {s.max_frames})")

    def _refuse_unsupported(self, messages: list[dict], where: str) -> None:
        kinds = {kind for kind, _ in media_parts(messages)} - set(self.PLACEHOLDERS)
        if kinds:
            raise DataError(where, None, f"{' and '.join(sorted(kinds))} parts: {type(self).__name__.removesuffix('Encoder')} "
                                         f"models take {' and '.join(sorted(self.PLACEHOLDERS))}s only")

    def phantom_row(self, kind: str) -> dict:
        """A row of one smallest ``kind`` of media and nothing else, trained on nowhere (labels all
        -100): added to a batch without that kind of media, it makes the vision tower run on it."""
        media = self.phantom_media(kind)
        placeholder = next(token for token, k in self.placeholder_ids.items() if k == kind)
        ids = self.expanded(placeholder, media)
        return {"input_ids": ids, "labels": [IGNORE] * len(ids), "media": [media]}

    # --- batches ---------------------------------------------------------------------------
    def collate(self, rows: list[dict], left: bool = False, every_kind: tuple[str, ...] = ()) -> dict:
        """Rows padded into one batch (on the right; ``left`` for generation, where answers grow at
        the right edge); the media of all rows batched in order. ``every_kind``: a phantom row is
        added for each of these media kinds the rows lack, so that every batch runs the vision
        tower the same way (DeepSpeed ZeRO-3 gathers the tower's weights from every rank: a rank
        whose batch skips it leaves the others waiting for ever)."""
        import torch

        present = {m["kind"] for r in rows for m in r["media"]}
        rows = rows + [self.phantom_row(kind) for kind in every_kind if kind not in present]

        width = max(len(r["input_ids"]) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

        def padded(values: list, fill) -> list:
            extra = [fill] * (width - len(values))
            return extra + values if left else values + extra

        batch = {"input_ids": torch.tensor([padded(r["input_ids"], pad) for r in rows]),
                 "attention_mask": torch.tensor([padded([1] * len(r["input_ids"]), 0) for r in rows])}
        if not left:
            batch["labels"] = torch.tensor([padded(r["labels"], IGNORE) for r in rows])
        media = [m for r in rows for m in r["media"]]
        batch.update(self.batch_media([m for m in media if m["kind"] == "image"],
                                      [m for m in media if m["kind"] == "video"]))
        return batch


class QwenVLEncoder(VisionEncoder):
    """Qwen2-VL / Qwen2.5-VL rows: 14-pixel patches merged 2x2, 2 frames per temporal patch; one
    ``<|image_pad|>`` / ``<|video_pad|>`` per merged patch."""

    PLACEHOLDERS = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
    VISION_MODULES = {"tower": r"visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))",
                      "projector": r"visual\.merger\.mlp\.(0|2)"}  # mlp.1 is the GELU between them

    def __init__(self, model_dir: str | Path, settings: VisionSettings, cache_dir: str | Path | None):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        super().__init__(model_dir, settings, cache_dir)
        self.images = Qwen2VLImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
        self.patch, self.merge = self.images.patch_size, self.images.merge_size
        self.temporal = self.images.temporal_patch_size
        self.factor = self.patch * self.merge

    def expanded(self, placeholder: int, media: dict) -> list[int]:
        return [placeholder] * media["tokens"]

    def media_tokens(self, kind: str, path: str) -> int:
        return self._grid_tokens(*(self._image_grid(path) if kind == "image" else self._video_grid(path)))

    def _grid_tokens(self, t: int, h: int, w: int) -> int:
        return t * h * w // (self.merge * self.merge)

    def _image_grid(self, path: str) -> tuple[int, int, int]:
        info = self._probe(path, "image")
        width, height = fit_pixels(info.width, info.height, self.settings.max_pixels, self.factor)
        return 1, height // self.patch, width // self.patch

    def _video_grid(self, path: str) -> tuple[int, int, int]:
        s = self.settings
        info = self._probe(path, "video")
        frames = len(sample_times(info.duration_s, s.fps, s.max_frames)[0])
        width, height = fit_pixels(info.width, info.height, s.max_pixels, self.factor)
        return -(-frames // self.temporal), height // self.patch, width // self.patch

    # --- pixels ----------------------------------------------------------------------------
    def _image(self, path: str) -> dict:
        return self._picture(load_image(path, self.settings.max_pixels, self.factor))

    def _picture(self, image) -> dict:
        # Qwen's image processor reads its pixel budget as size: shortest_edge = min, longest_edge = max pixels.
        out = self.images(images=[image], size={"shortest_edge": self.factor ** 2,
                                                "longest_edge": self.settings.max_pixels}, return_tensors="np")
        grid = tuple(int(x) for x in out["image_grid_thw"][0])
        return {"kind": "image", "pixels": out["pixel_values"], "grid": grid, "tokens": self._grid_tokens(*grid)}

    def phantom_media(self, kind: str) -> dict:
        """The smallest image or video (one merged patch, grey) for a row no one trains on."""
        from PIL import Image

        if kind == "image":
            return self._picture(Image.new("RGB", (self.factor, self.factor), (128, 128, 128)))
        frames = np.full((self.temporal, self.factor, self.factor, 3), 128, dtype=np.uint8)
        pixels, grid = self.video_patches(frames)
        return {"kind": "video", "pixels": pixels, "grid": grid, "tokens": self._grid_tokens(*grid),
                "second_per_grid": 1.0}

    def _video(self, path: str) -> dict:
        s = self.settings
        if self.cache is None:
            raise UsageError("this encoder only counts tokens (no frame cache); give it a cache_dir to decode video")
        clip = self.cache.video(path, s.fps, s.max_frames, s.max_pixels, self.factor)
        pixels, grid = self.video_patches(clip.frames)
        return {"kind": "video", "pixels": pixels, "grid": grid, "tokens": self._grid_tokens(*grid),
                "second_per_grid": self.temporal / clip.fps}

    def video_patches(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(patches, (t, h, w) grid) of (T, H, W, 3) uint8 frames, as Qwen's video processor lays
        them out; a last frame is repeated to fill the last temporal patch."""
        ip, p, m, tp = self.images, self.patch, self.merge, self.temporal
        if len(frames) % tp:
            frames = np.concatenate([frames, np.repeat(frames[-1:], tp - len(frames) % tp, axis=0)])
        x = frames.astype(np.float32) * ip.rescale_factor
        x = (x - np.asarray(ip.image_mean, np.float32)) / np.asarray(ip.image_std, np.float32)
        x = x.transpose(0, 3, 1, 2)  # (T, C, H, W)
        t, c, height, width = x.shape
        gt, gh, gw = t // tp, height // p, width // p
        x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, tp, p, p)
        return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)), (gt, gh, gw)

    def batch_media(self, images: list[dict], videos: list[dict]) -> dict:
        """The patches of all images, then of all videos, concatenated, with their grids."""
        import torch

        batch = {}
        if images:
            batch["pixel_values"] = torch.from_numpy(np.concatenate([m["pixels"] for m in images]))
            batch["image_grid_thw"] = torch.tensor([m["grid"] for m in images])
        if videos:
            batch["pixel_values_videos"] = torch.from_numpy(np.concatenate([m["pixels"] for m in videos]))
            batch["video_grid_thw"] = torch.tensor([m["grid"] for m in videos])
            batch["second_per_grid_ts"] = torch.tensor([m["second_per_grid"] for m in videos])
        return batch


class PixtralEncoder(VisionEncoder):
    """Mistral3 (Mistral-Small-3.1) rows: a Pixtral tower of ``patch``-pixel patches, merged
    ``merge`` x ``merge`` by the projector. The template renders one ``[IMG]`` per image; it expands
    to one ``[IMG]`` per merged patch, row by row, each row closed by ``[IMG_BREAK]`` and the last by
    ``[IMG_END]`` (only the ``[IMG]`` positions take image features). Images only: the family has
    no video input."""

    PLACEHOLDERS = {"image": "[IMG]"}
    VISION_MODULES = {
        "tower": r"vision_tower\.transformer\.layers\.\d+\.(attention\.(q_proj|k_proj|v_proj|o_proj)"
                 r"|feed_forward\.(gate_proj|up_proj|down_proj))",
        "projector": r"multi_modal_projector\.(linear_1|linear_2|patch_merger\.merging_layer)"}

    def __init__(self, model_dir: str | Path, settings: VisionSettings, cache_dir: str | Path | None):
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        super().__init__(model_dir, settings, cache_dir)
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        self.patch, self.merge = config["vision_config"]["patch_size"], config.get("spatial_merge_size", 2)
        self.factor = self.patch * self.merge
        self.images = PixtralImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
        self.break_id, self.end_id = (self.tokenizer.convert_tokens_to_ids(t) for t in ("[IMG_BREAK]", "[IMG_END]"))

    def expanded(self, placeholder: int, media: dict) -> list[int]:
        rows, cols = media["grid"]
        ids = ([placeholder] * cols + [self.break_id]) * rows
        ids[-1] = self.end_id
        return ids

    def media_tokens(self, kind: str, path: str) -> int:
        rows, cols = self._grid(path)
        return rows * (cols + 1)

    def _grid(self, path: str) -> tuple[int, int]:
        info = self._probe(path, "image")
        width, height = fit_pixels(info.width, info.height, self.settings.max_pixels, self.factor, self.min_pixels)
        return height // self.factor, width // self.factor

    @property
    def min_pixels(self) -> int:
        # At least 2x2 merged patches: Mistral3 in transformers 5.23 squeezes a one-feature image's
        # features into a vector and fails to split them.
        return 4 * self.factor * self.factor

    def _image(self, path: str) -> dict:
        # Sized here, to multiples of factor, so the processor only rescales and normalizes.
        return self._picture(load_image(path, self.settings.max_pixels, self.factor, self.min_pixels))

    def phantom_media(self, kind: str) -> dict:
        """The smallest image the family takes (2x2 merged patches, grey), for a row no one trains on."""
        from PIL import Image

        side = 2 * self.factor
        return self._picture(Image.new("RGB", (side, side), (128, 128, 128)))

    def _picture(self, image) -> dict:
        out = self.images(images=[image], do_resize=False, return_tensors="np")
        rows, cols = image.height // self.factor, image.width // self.factor
        return {"kind": "image", "pixels": out["pixel_values"][0], "size": (image.height, image.width),
                "grid": (rows, cols), "tokens": rows * (cols + 1)}

    def _video(self, path: str) -> dict:
        raise DataError(path, None, "a video part: Mistral3 models take images only")

    def batch_media(self, images: list[dict], videos: list[dict]) -> dict:
        """The images zero-padded to the batch's largest height and width, with their real sizes
        (the tower patches each within its own size)."""
        import torch

        if not images:
            return {}
        height, width = max(m["size"][0] for m in images), max(m["size"][1] for m in images)
        pixels = np.zeros((len(images), 3, height, width), dtype=np.float32)
        for i, m in enumerate(images):
            pixels[i, :, :m["size"][0], :m["size"][1]] = m["pixels"]
        return {"pixel_values": torch.from_numpy(pixels), "image_sizes": torch.tensor([m["size"] for m in images])}
