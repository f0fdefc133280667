"""Media as a model will see it (slurmtune.data.media): real videos written with PyAV and real
PNGs, sampled at the asked rate or spread over a long video, sized within the pixel budget, decoded
once through the frame cache; and every kind of bad media one line each from `validate`."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_jsonl
from slurmtune.data import media
from slurmtune.data.media import FrameCache, MediaError, decode_video, fit_pixels, load_image, probe

FPS, SECONDS, LEVEL = 10, 3, 8  # frame i is flat gray at i * LEVEL


def write_video(path: Path, seconds: float = SECONDS, fps: int = FPS, size=(64, 48)) -> Path:
    """An mp4 whose frame i is flat gray i * LEVEL, so a decoded frame tells which one it was."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(int(seconds * fps)):
            frame = np.full((size[1], size[0], 3), i * LEVEL, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def frame_index(frame: np.ndarray) -> int:
    return round(float(frame.mean()) / LEVEL)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("media") / "talk.mp4")


def test_frames_are_taken_at_the_asked_rate(video):
    clip = decode_video(video, fps=2.0, max_frames=16, max_pixels=56 * 56)
    assert clip.timestamps == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5] and clip.fps == 2.0
    assert [frame_index(f) for f in clip.frames] == [0, 5, 10, 15, 20, 25]
    assert clip.frames.shape == (6, 56, 56, 3) and clip.frames.dtype == np.uint8  # multiples of 28


def test_a_long_video_gets_max_frames_spread_over_all_of_it(video):
    clip = decode_video(video, fps=2.0, max_frames=4, max_pixels=56 * 56)
    assert clip.timestamps == [0.0, 0.75, 1.5, 2.25]
    assert clip.fps == pytest.approx(1 / 0.75)  # the rate the model must be told, not the asked 2
    assert [frame_index(f) for f in clip.frames] == [0, 8, 15, 23]  # the first frame at or after each time


def test_sizes_keep_the_aspect_ratio_within_the_pixel_budget():
    w, h = fit_pixels(1920, 1080, 448 * 448)
    assert (w % 28, h % 28) == (0, 0) and w * h <= 448 * 448 and abs(w / h - 16 / 9) < 0.1
    assert fit_pixels(10, 10, 448 * 448) == (28, 28)  # at least one merged patch
    assert fit_pixels(1920, 1080, 448 * 448, factor=16) == (592, 336)  # Pixtral's 16-pixel patches


def test_an_image_is_loaded_within_the_budget(tmp_path):
    Image.new("RGB", (1000, 500), (200, 10, 10)).save(tmp_path / "doc.png")
    image = load_image(tmp_path / "doc.png", max_pixels=200_704)
    assert image.mode == "RGB" and image.size == fit_pixels(1000, 500, 200_704)
    assert image.getpixel((5, 5)) == (200, 10, 10)


def test_the_cache_decodes_a_video_once_and_again_when_it_changes(video, tmp_path, monkeypatch):
    cache = FrameCache(tmp_path / "frames")
    first = cache.video(video, 2.0, 16, 56 * 56)
    assert len(list((tmp_path / "frames").glob("*.npy"))) == 1
    monkeypatch.setattr(media, "decode_video", lambda *a, **k: pytest.fail("decoded again"))
    again = cache.video(video, 2.0, 16, 56 * 56)
    assert np.array_equal(again.frames, first.frames) and again.timestamps == first.timestamps
    monkeypatch.undo()
    other = cache.video(video, 1.0, 16, 56 * 56)  # another sampling setting: its own entry
    assert len(other.frames) == 3 and len(list((tmp_path / "frames").glob("*.npy"))) == 2
    changed = write_video(tmp_path / "talk.mp4", seconds=1)
    assert len(cache.video(changed, 2.0, 16, 56 * 56).frames) == 2


def png_with_size(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_bad_media_is_one_line_each(cli, video, tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    whole = video.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "notes.mp4").write_text("these are my speaking notes, not a video\n")
    (tmp_path / "zero.png").write_bytes(png_with_size(0, 0))
    Image.new("RGB", (40, 30)).save(tmp_path / "good.png")

    def row(kind: str, name: str) -> dict:
        return {"messages": [{"role": "user", "content": [{"type": "text", "text": "Score it."},
                                                           {"type": kind, kind: name}]},
                             {"role": "assistant", "content": "4"}]}

    rows = [row("video", "talk-missing.mp4"), row("video", "empty.mp4"), row("video", "cut.mp4"),
            row("video", "notes.mp4"), row("image", "zero.png"), row("image", "good.png"),
            row("video", str(video))]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    r = cli("validate", data, "--check-paths")
    assert r.code == 1
    problems = [line for line in r.out.splitlines() if re.match(rf"{re.escape(str(data))}:\d+: ", line)]
    at = "messages[0].content[1]"
    assert problems[0] == f"{data}:1: {at}.video: file not found: talk-missing.mp4"
    assert problems[1] == f"{data}:2: {at}.video: {tmp_path / 'empty.mp4'} is empty (0 bytes); expected a readable video"
    assert problems[2].startswith(f"{data}:3: {at}.video: {tmp_path / 'cut.mp4'} is not a readable video (")
    assert problems[3].startswith(f"{data}:4: {at}.video: {tmp_path / 'notes.mp4'} is not a readable video (")
    assert problems[4].startswith(f"{data}:5: {at}.image: {tmp_path / 'zero.png'} ")
    assert problems[4].endswith("; expected a readable image")
    assert len(problems) == 5  # good.png and the real video pass
    assert r.out.splitlines()[-1] == "checked 7 rows in 1 file(s): 5 problem(s)"
    assert json.loads(cli("validate", data, "--check-paths", "--json").out)["rows"] == 7


def test_probe_says_what_a_video_is(video):
    info = probe(video, "video")
    assert (info.kind, info.width, info.height, info.fps) == ("video", 64, 48, 10.0)
    assert info.duration_s == pytest.approx(3.0, abs=0.11) and info.frames == 30
    with pytest.raises(MediaError, match="has no video stream|not a readable video"):
        probe(Path(__file__), "video")
