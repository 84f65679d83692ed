"""Reuse the frozen vision tower's outputs: every epoch after the first feeds the text model frames it has seen.

With the tower frozen (`image_encoder_lr` 0, as in the reference run) and free of dropout, its output for a frame
depends on that frame's pixels alone, so recomputing it each epoch is wasted work: on the tiny model it is about a
quarter of a training step on a CPU (bench/bench_vision_cache.py). `install` wraps the tower's `forward`: each frame
is keyed by a digest of its pixel values and patch positions, its output is kept on the CPU (up to
`vision_cache_gb`), and the tower runs only on frames it has not seen. The text model, the projector
(`embed_vision`) and everything trainable run as before.

Off when the tower trains, has active dropout, or is partitioned by ZeRO-3 (its parameters are gathered by hooks
that a skipped forward would leave out of DeepSpeed's trace).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().view(torch.uint8).reshape(-1).numpy())


# Off the CPU, a frame's key is 2 x 64-bit random linear fingerprints of its bits, computed where the tensor lives (no
# copy to the host); integer sums wrap exactly, in any order, so a frame gets the same key in any batch.
_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def _weights(n: int, device: torch.device) -> torch.Tensor:
    key = (n, str(device))
    if key not in _WEIGHTS:
        g = torch.Generator().manual_seed(n)
        _WEIGHTS[key] = torch.randint(-(2**62), 2**62, (2, n), generator=g, dtype=torch.int64).to(device)
    return _WEIGHTS[key]


def _as_ints(t: torch.Tensor) -> torch.Tensor:
    """A frame's raw bits as int64 values (one per element), whatever its dtype."""
    flat = t.detach().contiguous().reshape(-1)
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[flat.element_size()]
    return flat.view(as_int).to(torch.int64)


def frame_digests(pixel_values: torch.Tensor, positions: torch.Tensor, on_device: bool | None = None) -> list[bytes]:
    """One key per frame (first dimension): sha256 of the bytes on a CPU, an exact integer fingerprint elsewhere."""
    if on_device is None:
        on_device = pixel_values.device.type != "cpu"
    tag = f"{pixel_values.dtype}{tuple(pixel_values.shape[1:])}".encode()
    if not on_device:
        out = []
        for pv, pos in zip(pixel_values, positions):
            h = hashlib.sha256(tag)
            h.update(_as_bytes(pv))
            h.update(_as_bytes(pos))
            out.append(h.digest())
        return out
    sums = []
    for pv, pos in zip(pixel_values, positions):
        bits = torch.cat([_as_ints(pv), _as_ints(pos)])
        sums.append((bits * _weights(bits.numel(), bits.device)).sum(-1))
    return [b"d" + tag + bytes(row.numpy().tobytes()) for row in torch.stack(sums).cpu()]


def towers(model) -> list[torch.nn.Module]:
    """The Gemma 4 vision towers inside a (peft-wrapped) model: one, or two where peft keeps a trainable copy."""
    return [m for m in model.modules() if type(m).__name__ == "Gemma4VisionModel"]


def find_tower(model) -> torch.nn.Module | None:
    """The model's one Gemma 4 vision tower, or None."""
    found = towers(model)
    return found[0] if len(found) == 1 else None


class VisionCache:
    """Wraps `tower.forward`; `remove()` puts the original back. Counts frames computed and served from the cache."""

    def __init__(self, tower: torch.nn.Module, max_bytes: int):
        self.tower = tower
        self.max_bytes = max_bytes
        self.pool = tower.config.pooling_kernel_size ** 2
        self.store: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.computed = 0
        self.full = False
        self.layout_unknown = False  # set when the tower's output cannot be split per frame: then always bypassed
        self._forward = tower.forward
        tower.forward = self.forward

    def remove(self) -> None:
        if self.tower.__dict__.get("forward") == self.forward:
            del self.tower.forward
        self.store.clear()
        self.bytes = 0

    def forward(self, pixel_values=None, pixel_position_ids=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        wants_more = kwargs.get("output_hidden_states") or kwargs.get("output_attentions")
        if wants_more or self.layout_unknown or not torch.is_tensor(pixel_values) or pixel_values.dim() != 3:
            return self._forward(pixel_values=pixel_values, pixel_position_ids=pixel_position_ids, **kwargs)
        keys = frame_digests(pixel_values, pixel_position_ids)
        todo: dict[bytes, int] = {}  # frames to compute -> their first row in this batch
        for i, key in enumerate(keys):
            if key not in self.store and key not in todo:
                todo[key] = i
        fresh: dict[bytes, torch.Tensor] = {}
        if todo:
            idx = torch.tensor(list(todo.values()), device=pixel_values.device)
            pv, pos = pixel_values.index_select(0, idx), pixel_position_ids.index_select(0, idx)
            hidden = self._forward(pixel_values=pv, pixel_position_ids=pos, **kwargs).last_hidden_state
            sizes = ((pos != -1).all(-1).sum(-1) // self.pool).tolist()
            if sum(sizes) != hidden.shape[0]:  # not the layout this cache knows: compute everything, keep nothing
                self.layout_unknown = True
                return self._forward(pixel_values=pixel_values, pixel_position_ids=pixel_position_ids, **kwargs)
            self.computed += len(todo)
            for key, part in zip(todo, hidden.detach().split(sizes)):
                fresh[key] = part
                size = part.numel() * part.element_size()
                if self.bytes + size <= self.max_bytes:
                    self.store[key] = part.to("cpu", copy=True)
                    self.bytes += size
                else:
                    self.full = True
        self.hits += len(keys) - len(todo)
        parts = [fresh[k] if k in fresh else self.store[k].to(pixel_values.device, non_blocking=True) for k in keys]
        return BaseModelOutputWithPooling(last_hidden_state=torch.cat(parts))

    def stats(self) -> dict[str, Any]:
        return {"frames_kept": len(self.store), "frames_computed": self.computed, "frames_reused": self.hits,
                "mib": round(self.bytes / 2**20, 1), "full": self.full, "bypassed": self.layout_unknown}


def why_not(model, cfg: dict[str, Any], zero3: bool = False) -> str | None:
    """Why the tower's outputs cannot be reused in this run, or None when they can."""
    found = towers(model)
    if cfg.get("vision_cache_gb", 0) <= 0:
        return "vision_cache_gb is 0"
    if any(p.requires_grad for t in found for p in t.parameters()):
        return "the vision tower trains (image_encoder_lr > 0)"
    if len(found) != 1:
        return "the model has no Gemma 4 vision tower" if not found else "the model holds copies of its vision tower"
    tower = found[0]
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in tower.modules()) or getattr(
            tower.config, "attention_dropout", 0.0):
        return "the vision tower has dropout"
    if zero3:
        return "ZeRO-3 partitions the vision tower"
    return None


def install(model, cfg: dict[str, Any], zero3: bool = False) -> tuple[VisionCache | None, str]:
    """Wrap the frozen vision tower of `model` when the run allows it; returns (cache or None, a one-line reason)."""
    reason = why_not(model, cfg, zero3)
    if reason is not None:
        return None, f"vision cache off: {reason}"
    cache = VisionCache(find_tower(model), int(cfg["vision_cache_gb"] * 2**30))
    gib = cfg["vision_cache_gb"]
    return cache, f"vision cache on: the frozen tower's outputs are kept on the CPU (up to {gib:g} GiB)"
