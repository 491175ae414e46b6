"""Zero-shot video (methods.md §1d): frame sampling, decoding a clip the test writes with PyAV, temporal
max-pooling into the single ``<image>`` slot, batched generation, the context check and ``vlweave chat --video``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import isolated_env, make_run
from vlweave import cli
from vlweave.builder import build_model, save_checkpoint
from vlweave.data.video import count_frames, read_video_frames, sample_frame_indices
from vlweave.eval.vqa import stop_token_ids
from vlweave.processing import encode_prompt
from vlweave.serve.chat import ChatSession, load_video_tensor


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def write_clip(path: Path, n_frames: int = 24, size: int = 32) -> Path:
    """An mpeg4 clip whose frame ``i`` is a flat grey of level ``10 * i`` (so decoded frames identify themselves)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            img = np.full((size, size, 3), 10 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("video") / "clip.mp4")


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    cfg = make_run(tmp_path_factory.mktemp("video-model"), vision="clip", tokenizer="chatml", template="tokenizer")
    model, tok = build_model(cfg)
    return model.eval(), tok


def test_sample_frame_indices_segment_midpoints():
    # seg = 99/8 = 12.375: (round(seg*i) + round(seg*(i+1))) // 2, worked by hand
    assert sample_frame_indices(100, 8) == [6, 18, 31, 43, 56, 68, 80, 93]
    assert sample_frame_indices(24, 4) == [3, 9, 14, 20]
    assert sample_frame_indices(5, 5) == [0, 1, 2, 2, 3]  # seg 0.8: a frame repeats, as in the reference
    with pytest.raises(ValueError, match="fewer than the 9 requested"):
        sample_frame_indices(8, 9)


def test_read_frames_of_a_generated_clip(clip):
    assert count_frames(clip) == 24
    frames = read_video_frames(clip, 4)
    assert [f.size for f in frames] == [(32, 32)] * 4
    levels = [float(np.asarray(f).mean()) for f in frames]
    for level, index in zip(levels, [3, 9, 14, 20]):
        assert abs(level - 10 * index) < 4, levels


def test_bad_video_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such video file"):
        read_video_frames(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="bad.mp4: cannot open video"):
        read_video_frames(bad)


def test_video_features_pool_each_frame_and_concatenate(model_and_tokenizer):
    model, _ = model_and_tokenizer
    n = model.num_image_tokens  # 16
    videos = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.get_video_features(videos)
        per_frame, _ = model.get_image_features(videos.flatten(0, 1))
    assert tokens.shape == (2, 3 * n // 2, 64) and model.num_video_tokens(3) == 3 * n // 2
    pooled = torch.maximum(per_frame[:, 0::2], per_frame[:, 1::2])  # max over pairs of row-major tokens
    torch.testing.assert_close(tokens, pooled.reshape(2, 3 * n // 2, 64))
    with pytest.raises(ValueError, match=r"more than the LM's context of 512; use fewer frames"):
        model.get_video_features(torch.randn(1, 70, 3, 32, 32))


def test_batched_video_generation_equals_one_by_one(model_and_tokenizer, clip):
    model, tok = model_and_tokenizer
    videos = torch.cat([load_video_tensor(model, str(clip), 4), load_video_tensor(model, str(clip), 4).flip(1)])
    questions = ["What is this?", "What color is it? Be brief."]
    prompts = [encode_prompt([{"from": "human", "value": "<image>\n" + q}], tok, "tokenizer",
                             image_token_id=model.config.image_token_id, num_image_tokens=model.num_video_tokens(4),
                             system_prompt="", sample_id=str(i)) for i, q in enumerate(questions)]
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id)
    singles = [model.generate(torch.tensor([p]), pixel_values_videos=videos[i:i + 1], **kw)[0].tolist()
               for i, p in enumerate(prompts)]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(ids, attention_mask=mask, pixel_values_videos=videos, **kw)
    for row, single in zip(batched.tolist(), singles):
        assert row[: len(single)] == single


def test_chat_video_session_and_cli(model_and_tokenizer, clip, tmp_path, capsys):
    model, tok = model_and_tokenizer
    session = ChatSession(model, tok, video=str(clip), num_frames=4, max_new_tokens=3)
    assert session.num_visual_tokens == model.num_video_tokens(4) == 32
    assert isinstance(session.ask("What is this?"), str)
    with pytest.raises(ValueError, match="not both"):
        ChatSession(model, tok, image="x.png", video=str(clip))
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    assert cli.main(["chat", str(ckpt), "--video", str(clip), "--frames", "4", "--prompt", "Describe",
                     "--max-new-tokens", "2"]) == 0
    assert cli.main(["chat", str(ckpt), "--video", str(tmp_path / "none.mp4"), "--prompt", "x"]) == 2
    assert "no such video file" in capsys.readouterr().err
