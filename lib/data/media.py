"""Images and videos as a model will see them, one way for the checks, training, evaluation and
serving: opened, sampled in time, sized within a pixel budget, and cached once decoded.

::

    problem = media_problem("talks/s1.mp4", "video")      # None, or why it cannot be used
    info = probe("talks/s1.mp4", "video")                 # MediaInfo(kind, width, height, frames, fps, duration_s)
    clip = decode_video("talks/s1.mp4", fps=2.0, max_frames=16, max_pixels=200_704)
    clip.frames.shape, clip.timestamps, clip.fps          # (T, H, W, 3) uint8, seconds, the sampled fps
    cache = FrameCache("~/.cache/slurmtune/frames")
    clip = cache.video("talks/s1.mp4", fps=2.0, max_frames=16, max_pixels=200_704)  # decoded once
    thumbnail("talks/s1.mp4", "video")                    # Thumbnail(uri="data:image/jpeg;base64,...", caption)

Videos are decoded with PyAV (FFmpeg in its wheel; no system FFmpeg on the nodes). Frames are
taken at ``fps`` from the start; a video longer than ``max_frames / fps`` seconds gets
``max_frames`` frames spread evenly over its whole length instead, and ``clip.fps`` says the rate
actually sampled: models with temporal positions (Qwen2.5-VL) must be given that rate, or they
misplace every frame in time. Sizes keep the aspect ratio, are multiples of ``factor`` (the
vision tower's patch x merge size) and stay within ``max_pixels`` per frame or image.

The cache keys a clip by the file's path, size and modification time and the sampling
settings, and stores it as ``.npy`` (no pickle) written atomically, so a 3-epoch run and its
eval decode each video once, and a changed file is decoded again.

Pages (report.html, a review page) show an image as a small JPEG and a video as a strip of
frames spread over its length, inline as ``data:`` URIs, so a page stays one file that loads
nothing.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE, VIDEO = "image", "video"
FACTOR = 28  # Qwen2.5-VL: patch 14 x merge 2; Pixtral: 16 (pass factor=16)


class MediaError(ValueError):
    """A media file that cannot be used; the message says why, for one line of a report."""


@dataclass(frozen=True)
class MediaInfo:
    kind: str
    width: int
    height: int
    frames: int  # 1 for an image; for a video as its container says (0 if it does not say)
    fps: float = 0.0
    duration_s: float = 0.0


@dataclass
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8, RGB
    timestamps: list[float]  # seconds from the start, one per frame
    fps: float  # the rate the frames were sampled at


def media_problem(path: str | Path, kind: str) -> str | None:
    """Why ``path`` cannot be used as ``kind`` (image or video), or None when it can."""
    try:
        probe(path, kind)
    except MediaError as e:
        return str(e)
    return None


def probe(path: str | Path, kind: str) -> MediaInfo:
    """Open ``path`` and read its size (and a video's first frame, length and rate)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"no such file {path}")
    if path.stat().st_size == 0:
        raise MediaError(f"{path} is empty (0 bytes)")
    return _probe_image(path) if kind == IMAGE else _probe_video(path)


def _probe_image(path: Path) -> MediaInfo:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()  # verify() does not decode the pixels; a truncated file fails here
            width, height = image.size
    except UnidentifiedImageError:
        raise MediaError(f"{path} is not a readable image (no image format known to Pillow, or damaged)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"{path} is not a readable image ({e})") from None
    if width < 1 or height < 1:
        raise MediaError(f"{path} has {width}x{height} pixels; expected an image with pixels")
    return MediaInfo(IMAGE, width, height, 1)


def _probe_video(path: Path) -> MediaInfo:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream (audio only, or not a video)")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise MediaError(f"{path}: no frame could be decoded")
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            duration = _duration(container, stream)
            return MediaInfo(VIDEO, first.width, first.height, stream.frames or round(duration * fps), fps, duration)
    except av.error.FFmpegError as e:
        raise MediaError(f"{path} is not a readable video ({e.strerror or type(e).__name__})") from None


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return float(container.duration or 0) / 1_000_000  # av.time_base: microseconds


def fit_pixels(width: int, height: int, max_pixels: int, factor: int = FACTOR,
               min_pixels: int = FACTOR * FACTOR) -> tuple[int, int]:
    """(width, height): the aspect ratio kept, multiples of ``factor``, the area within
    [min_pixels, max_pixels]."""
    w, h = max(factor, round(width / factor) * factor), max(factor, round(height / factor) * factor)
    if w * h > max_pixels:
        scale = math.sqrt(width * height / max_pixels)
        w = max(factor, math.floor(width / scale / factor) * factor)
        h = max(factor, math.floor(height / scale / factor) * factor)
    elif w * h < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
        w, h = math.ceil(width * scale / factor) * factor, math.ceil(height * scale / factor) * factor
    return w, h


def sample_times(duration_s: float, fps: float, max_frames: int) -> tuple[list[float], float]:
    """(the times to take frames at, the rate that is): every 1/fps s, or ``max_frames`` spread
    evenly over a longer video."""
    count = max(1, math.floor(duration_s * fps + 1e-6))
    if count <= max_frames:
        return [i / fps for i in range(count)], fps
    step = duration_s / max_frames
    return [i * step for i in range(max_frames)], 1 / step


def decode_video(path: str | Path, fps: float, max_frames: int, max_pixels: int, factor: int = FACTOR) -> Clip:
    """The frames a model sees of a video (see the module's docstring)."""
    import av

    info = probe(path, VIDEO)
    times, rate = sample_times(info.duration_s, fps, max_frames)
    width, height = fit_pixels(info.width, info.height, max_pixels, factor)
    frames, stamps = [], []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base) if frame.pts is not None else len(frames) / (info.fps or 1)
                while len(frames) < len(times) and t + 1e-6 >= times[len(frames)]:
                    frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
                    stamps.append(times[len(frames) - 1])
                if len(frames) == len(times):
                    break
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: decoding failed after {len(frames)} frame(s) ({e.strerror or type(e).__name__}); "
                         "the file is damaged or truncated") from None
    if not frames:
        raise MediaError(f"{path}: no frame could be decoded")
    return Clip(np.stack(frames), stamps, rate)


def load_image(path: str | Path, max_pixels: int, factor: int = FACTOR, min_pixels: int | None = None):
    """The image as RGB, sized within [``min_pixels`` (default factor²), ``max_pixels``] (a PIL image)."""
    from PIL import Image

    info = probe(path, IMAGE)
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    size = fit_pixels(info.width, info.height, max_pixels, factor, min_pixels or factor * factor)
    return rgb if rgb.size == size else rgb.resize(size, Image.Resampling.BICUBIC)


class FrameCache:
    """Decoded clips on disk, keyed by the file and the sampling settings."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def video(self, path: str | Path, fps: float, max_frames: int, max_pixels: int, factor: int = FACTOR) -> Clip:
        key = self.key(path, fps, max_frames, max_pixels, factor)
        frames_file, meta_file = self.root / f"{key}.npy", self.root / f"{key}.json"
        if frames_file.is_file() and meta_file.is_file():
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            return Clip(np.load(frames_file, allow_pickle=False), meta["timestamps"], meta["fps"])
        clip = decode_video(path, fps, max_frames, max_pixels, factor)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.npy"
        np.save(tmp, clip.frames, allow_pickle=False)
        os.replace(tmp, frames_file)
        tmp_meta = self.root / f".{key}.{os.getpid()}.json"
        tmp_meta.write_text(json.dumps({"source": str(Path(path).resolve()), "timestamps": clip.timestamps,
                                        "fps": clip.fps}), encoding="utf-8")
        os.replace(tmp_meta, meta_file)  # written last: a clip is cached only once both are complete
        return clip

    @staticmethod
    def key(path: str | Path, fps: float, max_frames: int, max_pixels: int, factor: int) -> str:
        stat = Path(path).stat()
        text = json.dumps([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, fps, max_frames, max_pixels,
                           factor])
        return hashlib.sha256(text.encode()).hexdigest()[:32]


THUMB_HEIGHT = 96  # pixels, for a page's thumbnails
STRIP_FRAMES = 4


@dataclass(frozen=True)
class Thumbnail:
    uri: str  # data:image/jpeg;base64,...
    caption: str  # the size, or a video's length and the times of its frames


def thumbnail(path: str | Path, kind: str, height: int = THUMB_HEIGHT, frames: int = STRIP_FRAMES) -> Thumbnail:
    """A page's view of an image (a JPEG ``height`` pixels high) or a video (``frames`` frames
    spread over its length, side by side). Raises MediaError when the file cannot be used."""
    from PIL import Image

    info = probe(path, kind)
    if kind == IMAGE:
        with Image.open(path) as image:
            picture = image.convert("RGB")
        caption = f"{info.width}x{info.height}"
    else:
        fps = frames / info.duration_s if info.duration_s > 0 else 1.0
        scale = height / info.height
        clip = decode_video(path, fps, frames, max(4, round(info.width * scale)) * height, factor=2)
        picture = Image.fromarray(np.concatenate(list(clip.frames), axis=1))
        stamps = ", ".join(f"{t:.1f}" for t in clip.timestamps)
        caption = f"{info.width}x{info.height}, {info.duration_s:.1f} s; frames at {stamps} s"
    width = max(1, round(picture.width * height / picture.height))
    picture = picture.resize((width, height), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=70)
    return Thumbnail("data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii"), caption)
