"""Video items end to end: the collator's video path, a short LoRA run on video items, and predict on a clip."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from actionft.collate import IGNORE_INDEX, Collator, check_labels, check_padding, check_soft_tokens, check_template
from actionft.data import Sample, load_dataset
from actionft.paths import resolve_path
from actionft.synth import random_clip, render, write_video

NUM_FRAMES = 4


@pytest.fixture(scope="module")
def dataset(synth_no_val) -> Path:
    return synth_no_val


@pytest.fixture(scope="module")
def videos(dataset) -> list[Sample]:
    return load_dataset(dataset / "data_video.json", dataset, dataset / "metadata.csv", num_frames=NUM_FRAMES,
                        progress=False)


@pytest.fixture(scope="module")
def collator(processor) -> Collator:  # `processor`: the tiny model's, from conftest.py
    return Collator(processor, max_soft_tokens=70, num_frames=NUM_FRAMES, video_max_soft_tokens=70)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Sample:
    """A 16 s clip at 1 fps: its segment centres (2, 6, 10, 14 s) give distinct mm:ss timestamps."""
    import random

    path = tmp_path_factory.mktemp("long") / "grow_long.mp4"
    clip = random_clip("grow", "grow_long", random.Random(0))
    write_video(path, [render(clip.state((i + 0.5) / 16), 96) for i in range(16)], fps=1)
    return Sample(0, "grow_long", "What happens?", clip.answer, video=path)


def test_video_sample_goes_through_the_video_processor(collator, processor, videos):
    sample = videos[0]
    assert sample.video is not None and not sample.frames
    enc = collator.encode(sample)
    assert "pixel_values" not in enc and "image_position_ids" not in enc
    assert enc["pixel_values_videos"].shape[0] == NUM_FRAMES  # one entry of patches per frame
    assert enc["video_position_ids"].shape[:2] == enc["pixel_values_videos"].shape[:2]
    assert enc["num_frames_per_video"].tolist() == [NUM_FRAMES]
    video_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    soft = check_soft_tokens(collator, sample)
    assert soft["ok"] and len(soft["runs"]) == NUM_FRAMES, soft
    assert int((enc["input_ids"] == video_id).sum()) == sum(soft["runs"])
    assert int((enc["input_ids"] == image_id).sum()) == 0
    # mm_token_type_ids marks the video soft tokens (and only them) as multimodal
    assert torch.equal(enc["mm_token_type_ids"] != 0, enc["input_ids"] == video_id)


def test_frame_timestamps_are_in_the_prompt(collator, processor, videos, long_clip):
    for sample, expected in ((long_clip, ["00:02", "00:06", "00:10", "00:14"]),
                             (videos[0], ["00:00", "00:00", "00:01", "00:01"])):  # 2 s clip: 0.25, 0.75, 1.25, 1.75
        text = processor.tokenizer.decode(collator.encode(sample)["input_ids"])
        stamps = re.findall(r"(\d\d:\d\d) " + re.escape(processor.boi_token) + re.escape(processor.video_token), text)
        assert stamps == expected, text[:300]
        _, meta = collator.read_video(sample)
        assert [f"{int(t // 60):02d}:{int(t % 60):02d}" for t in meta.timestamps] == expected


def test_labels_cover_exactly_the_answer_and_end_of_turn(collator, videos, long_clip):
    tok = collator.tokenizer
    for sample in (videos[0], videos[5], long_clip):
        enc = collator.encode(sample)
        supervised = (enc["labels"] != IGNORE_INDEX).nonzero().flatten().tolist()
        expected = tok(sample.answer, add_special_tokens=False)["input_ids"] + [collator.eot_id]
        n = len(enc["input_ids"])
        assert supervised == list(range(n - len(expected), n))  # the last tokens, contiguous
        assert enc["labels"][supervised].tolist() == enc["input_ids"][supervised].tolist() == expected
        assert tok.decode(enc["input_ids"][supervised]) == sample.answer + "<turn|>"
        assert check_labels(collator, sample)["ok"]
        assert check_template(collator, sample)["ok"]


def test_padded_video_batch(collator, videos):
    check = check_padding(collator, videos[:3])
    assert check["ok"], check["problems"]
    batch = collator(videos[:3])
    assert batch["pixel_values_videos"].shape[0] == 3 * NUM_FRAMES
    assert batch["num_frames_per_video"].tolist() == [NUM_FRAMES] * 3


@torch.no_grad()
def test_the_model_sees_the_video_frames(collator, videos):
    """pixel_values_videos reach the vision tower: other pixels, other logits at the answer."""
    from actionft.modeling import load_model

    model = load_model("tiny").eval()
    batch = collator(videos[:2])
    batch.pop("labels")
    logits = model(**batch, use_cache=False).logits
    assert torch.isfinite(logits).all()
    blank = dict(batch, pixel_values_videos=torch.zeros_like(batch["pixel_values_videos"]))
    assert not torch.allclose(model(**blank, use_cache=False).logits[:, -8:], logits[:, -8:])


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> dict:
    """Two LoRA steps on video items through `actionft.train.train`, with the embedded default's params."""
    from actionft.params import load_params
    from actionft.train import train

    params = load_params(resolve_path("params/tiny.yaml"))
    params.update(
        run_name="video", output_root=str(tmp_path_factory.mktemp("runs")), synth=False,
        data_path=str(dataset / "data_video.json"), image_folder=str(dataset),
        metadata_path=str(dataset / "metadata.csv"),
        max_steps=2, per_device_train_batch_size=2, logging_steps=1, deepspeed=None, save_strategy="no",
        dataloader_num_workers=0,
    )
    summary = train(params, progress=False)
    return summary


def test_two_lora_steps_on_video_items(trained):
    assert trained["global_step"] == 2 and trained["train_samples"] == 9
    assert trained["val_samples"] == 0  # no evaluation in this run
    assert math.isfinite(trained["train_loss"]) and trained["train_loss"] > 0
    state = json.loads((Path(trained["run_dir"]) / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), state["log_history"]
    adapter = Path(trained["adapter_dir"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "processor_config.json").is_file()


def test_predict_on_a_clip_with_the_adapter(trained, dataset, capsys, monkeypatch):
    import actionft.cli

    monkeypatch.setattr(actionft.cli, "SUBCOMMANDS", {"predict": "actionft.infer"})
    clip = dataset / "videos" / "grow_0000.mp4"
    assert actionft.cli.main(["predict", "--adapter", trained["adapter_dir"], str(clip), "--max-new-tokens", "12"]) == 0
    # two steps teach nothing: any non-empty text is an answer here (quality is notebook 06's business)
    assert capsys.readouterr().out.strip()


def test_predict_as_video_uses_the_video_path(trained, dataset, capsys, monkeypatch):
    """`--as-video` turns the clip into one video item (video processor, no image items), and answers."""
    import actionft.cli
    from actionft.infer import frames_sample

    clip = dataset / "videos" / "grow_0000.mp4"
    sample = frames_sample([str(clip)], as_video=True)
    assert sample.video == clip.resolve() and sample.frames == []
    assert [c["type"] for c in sample.messages(with_answer=False)[0]["content"]] == ["video", "text"]
    assert frames_sample([str(clip)]).video is None and len(frames_sample([str(clip)]).frames) == 4
    monkeypatch.setattr(actionft.cli, "SUBCOMMANDS", {"predict": "actionft.infer"})
    assert actionft.cli.main(["predict", "--adapter", trained["adapter_dir"], str(clip), "--as-video",
                              "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip()
    assert actionft.cli.main(["predict", "--adapter", trained["adapter_dir"], str(dataset / "nope.mp4")]) == 2
    assert "video file not found" in capsys.readouterr().err


def test_generate_on_a_video_item_with_the_adapter(trained, videos):
    """The video path at generation time: a video sample, left-padded with an image-free batch."""
    from actionft.infer import generate_answers, load_for_inference

    model, processor = load_for_inference("tiny", trained["adapter_dir"], device="cpu")
    answers = generate_answers(model, processor, videos[:2], batch_size=2, max_new_tokens=12, max_soft_tokens=70,
                               num_frames=NUM_FRAMES, progress=False)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert any(a.strip() for a in answers), answers
