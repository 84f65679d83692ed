"""The frozen vision tower's outputs, reused: the text model gets what the tower would have computed, each frame is
computed once, and the cache stays off where reusing would be wrong."""

from __future__ import annotations

import pytest
import torch

from actionft.collate import Collator
from actionft.modeling import load_model
from actionft.train import DEFAULTS, build_model
from actionft.vision_cache import VisionCache, find_tower, frame_digests, install, why_not


@pytest.fixture(scope="module")
def model():
    return load_model("tiny").eval()


@pytest.fixture(scope="module")
def batches(processor, synth_samples):
    """Two batches of 3 clips that share one clip (4 frames each)."""
    collator = Collator(processor, max_soft_tokens=70)
    return collator(synth_samples[0:3]), collator(synth_samples[2:5])


def image_features(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model.get_image_features(batch["pixel_values"], batch["image_position_ids"])
    return torch.cat(out.pooler_output)


def test_cached_features_are_the_towers(model, batches):
    expected = [image_features(model, b) for b in batches]
    tower = find_tower(model)
    cache = VisionCache(tower, max_bytes=2**30)
    try:
        got = [image_features(model, b) for b in batches]
        again = image_features(model, batches[1])  # every frame from the cache now
    finally:
        cache.remove()
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, expected[1], rtol=1e-5, atol=1e-5)
    frames = {k for b in batches for k in frame_digests(b["pixel_values"], b["image_position_ids"])}
    assert len(frames) == 20  # 5 clips x 4 distinct frames
    stats = cache.stats()
    assert stats["frames_computed"] == 20  # the shared clip's frames were not recomputed
    assert stats["frames_reused"] == 4 + 12
    assert stats["frames_kept"] == 0 and stats["mib"] == 0  # remove() frees the memory
    assert "forward" not in tower.__dict__  # and puts the tower's own forward back


def test_a_full_cache_keeps_serving_correct_features(model, batches):
    tower = find_tower(model)
    expected = image_features(model, batches[0])
    with torch.no_grad():
        out = tower(pixel_values=batches[0]["pixel_values"][:1],
                    pixel_position_ids=batches[0]["image_position_ids"][:1])
    one_frame = out.last_hidden_state.numel() * out.last_hidden_state.element_size()
    cache = VisionCache(tower, max_bytes=2 * one_frame)
    try:
        first, second = image_features(model, batches[0]), image_features(model, batches[0])
        stats = cache.stats()
    finally:
        cache.remove()
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)
    assert stats["full"] and stats["frames_kept"] == 2
    assert stats["frames_reused"] == 2 and stats["frames_computed"] == 12 + 10


def test_a_frame_repeated_in_a_batch_is_computed_once(model, processor, synth_samples):
    batch = Collator(processor, max_soft_tokens=70)([synth_samples[0], synth_samples[0]])
    expected = image_features(model, batch)
    cache = VisionCache(find_tower(model), max_bytes=2**30)
    try:
        got = image_features(model, batch)
        stats = cache.stats()
    finally:
        cache.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (stats["frames_computed"], stats["frames_reused"]) == (4, 4)


@pytest.mark.parametrize("on_device", [False, True], ids=["sha256", "integer-fingerprint"])
def test_frame_keys_depend_on_the_frame_alone(batches, on_device):
    """Both digests (bytes on a CPU; integer fingerprints where the tensor lives, as on a GPU): a frame has the same
    key in any batch and position, and a one-ulp change in one pixel value changes it."""
    a, b = batches
    keys_a = frame_digests(a["pixel_values"], a["image_position_ids"], on_device=on_device)
    keys_b = frame_digests(b["pixel_values"], b["image_position_ids"], on_device=on_device)
    assert keys_a[8:12] == keys_b[0:4]  # clip 2 is the last of batch a and the first of batch b
    assert len(set(keys_a)) == 12
    one = a["pixel_values"][:1].clone()
    alone = frame_digests(one, a["image_position_ids"][:1], on_device=on_device)
    assert alone == keys_a[:1]
    one[0, 7, 5] = torch.nextafter(one[0, 7, 5], torch.tensor(2.0))
    assert frame_digests(one, a["image_position_ids"][:1], on_device=on_device) != keys_a[:1]
    moved = a["image_position_ids"][:1].clone()
    moved[0, 0] = moved[0, 1]
    assert frame_digests(a["pixel_values"][:1], moved, on_device=on_device) != keys_a[:1]


def test_hidden_states_asked_for_bypass_the_cache(model, batches):
    tower = find_tower(model)
    cache = VisionCache(tower, max_bytes=2**30)
    try:
        with torch.no_grad():
            out = tower(pixel_values=batches[0]["pixel_values"], pixel_position_ids=batches[0]["image_position_ids"],
                        output_hidden_states=True)
    finally:
        cache.remove()
    assert out.hidden_states is not None
    assert cache.computed == 0 and cache.hits == 0


def test_the_cache_is_on_only_where_reusing_is_exact():
    cfg = dict(DEFAULTS)
    frozen = build_model(cfg)
    assert why_not(frozen, cfg) is None
    cache, line = install(frozen, cfg)
    assert cache is not None and line.startswith("vision cache on") and "8 GiB" in line
    cache.remove()
    assert "vision_cache_gb is 0" in why_not(frozen, {**cfg, "vision_cache_gb": 0})
    assert "ZeRO-3" in why_not(frozen, cfg, zero3=True)
    trains = {**cfg, "image_encoder_lr": 1e-5}
    assert "trains" in why_not(build_model(trains), trains)
    find_tower(frozen).config.attention_dropout = 0.1
    try:
        assert "dropout" in why_not(frozen, cfg)
    finally:
        find_tower(frozen).config.attention_dropout = 0.0


def test_an_output_it_cannot_split_per_frame_turns_the_cache_off(model, batches):
    """A tower whose output does not hold (valid patches / pooling^2) rows per frame is never cached from."""
    expected = image_features(model, batches[0])
    cache = VisionCache(find_tower(model), max_bytes=2**30)
    cache.pool += 1  # what a tower with another pooling would look like to the cache
    try:
        got = [image_features(model, batches[0]) for _ in range(2)]
        stats = cache.stats()
    finally:
        cache.remove()
    for g in got:
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-5)
    assert stats["bypassed"] and stats["frames_kept"] == 0 and stats["frames_reused"] == 0
