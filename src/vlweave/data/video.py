"""Video input for training-free video QA (Dense Connector §3.4 / FreeVA; methods.md §1d).

Frames are decoded with PyAV (maintained FFmpeg bindings from PyPI) and sampled at segment midpoints exactly as the
reference ``dc/eval/model_utils.py``: split ``[0, n-1]`` into ``T`` equal segments of length ``seg = (n-1)/T`` and
take ``(round(seg*i) + round(seg*(i+1))) // 2`` for segment ``i``.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def sample_frame_indices(num_frames: int, num_samples: int) -> list[int]:
    """Indices of ``num_samples`` frames at the middle of equal segments of a ``num_frames``-frame video."""
    if num_samples < 1:
        raise ValueError(f"need at least one frame to sample, got num_frames={num_samples}")
    if num_frames < num_samples:
        raise ValueError(f"the video has {num_frames} frames, fewer than the {num_samples} requested")
    seg = (num_frames - 1) / num_samples
    return [(round(seg * i) + round(seg * (i + 1))) // 2 for i in range(num_samples)]


def _open(path: str | Path):
    import av

    try:
        container = av.open(str(path))
    except (OSError, av.error.FFmpegError) as exc:  # type: ignore[attr-defined]
        raise ValueError(f"{path}: cannot open video: {exc}") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: no video stream")
    return container


def count_frames(path: str | Path) -> int:
    """Number of decodable frames (the container's count when it has one, else by decoding)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))


def read_video_frames(path: str | Path, num_frames: int = 8) -> list[Image.Image]:
    """``num_frames`` RGB frames sampled at segment midpoints (decoded in one pass, only the chosen ones kept)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such video file")
    total = count_frames(path)
    wanted = sample_frame_indices(total, num_frames)
    picked: dict[int, Image.Image] = {}
    with _open(path) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in wanted:
                picked[i] = frame.to_image().convert("RGB")
            if i >= wanted[-1]:
                break
    missing = [i for i in wanted if i not in picked]
    if missing:
        raise ValueError(f"{path}: could decode only {len(picked)} of the frames {wanted} (container says {total})")
    return [picked[i] for i in wanted]
