"""Decoding training videos: frames per second decoded cold (PyAV) against read from the frame cache.

::

    python bench/bench_media.py                 # 8 videos of 20 s, 640x360 at 25 fps (~1 min)
    python bench/bench_media.py --videos 4 --seconds 60

The videos are written here with PyAV (mpeg4, moving gradients, so no frame is a copy of the
last). Each is sampled as training samples it (``vision.fps`` 2, at most 16 frames, 448x448
pixels at most per frame): cold = ``decode_video`` (open, decode from the start up to the last
sampled frame, convert and resize the sampled ones), cached = ``FrameCache.video`` once the
cache holds the clip (an ``.npy`` read). Three rounds each, alternating; medians. The ratio is
what a 3-epoch run saves on every video after its first epoch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def write_video(path: Path, seconds: int, fps: int = 25, size=(640, 360)) -> Path:
    import av

    y, x = np.mgrid[0:size[1], 0:size[0]]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(seconds * fps):
            frame = ((x + 3 * i) % 256).astype(np.uint8)[..., None].repeat(3, axis=2)
            frame[..., 1] = (y + i) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def main() -> int:
    from slurmtune.data.media import FrameCache, decode_video

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--seconds", type=int, default=20)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-media-"))
    videos = [write_video(root / f"talk-{i}.mp4", args.seconds) for i in range(args.videos)]
    settings = dict(fps=2.0, max_frames=16, max_pixels=448 * 448)
    cache = FrameCache(root / "cache")
    for v in videos:
        cache.video(v, **settings)  # fills the cache
    cold, warm, frames = [], [], 0
    for _ in range(3):
        start = time.perf_counter()
        frames = sum(len(decode_video(v, **settings).frames) for v in videos)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert sum(len(cache.video(v, **settings).frames) for v in videos) == frames
        warm.append(time.perf_counter() - start)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"{args.videos} videos x {args.seconds} s at 25 fps, 640x360; sampled: {frames} frames "
          f"(2 fps, at most 16 each, within 448x448)")
    print(f"{'path':<10}{'frames/s':>10}{'s per video':>13}")
    print(f"{'cold':<10}{frames / c:>10.1f}{c / args.videos:>13.3f}")
    print(f"{'cached':<10}{frames / w:>10.1f}{w / args.videos:>13.3f}")
    print(f"cached / cold: {c / w:.1f}x the frames per second")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
