"""Pictures for the notebooks: frame strips, the frames as the model sees them, motion, training curves."""

from __future__ import annotations

import textwrap

import numpy as np


def as_array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)


def plot_strips(rows: list[list], captions: list[str], width: float = 2.0, wrap: int = 90):
    """One row of frames per sample, its caption(s) above the row."""
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, (width + 0.45) * n_rows), squeeze=False)
    for r, (frames, caption) in enumerate(zip(rows, captions)):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(frames):
                ax.imshow(as_array(frames[c]), cmap="magma" if np.ndim(frames[c]) == 2 else None)
        axes[r][0].set_title("\n".join(textwrap.wrap(caption, wrap)), loc="left", fontsize=8)
    fig.tight_layout()
    return fig


def processed_frames(processor, images: list, max_soft_tokens: int) -> list[np.ndarray]:
    """Rebuild the frames from the processor's patches: the pixels (size, crop) the vision tower actually gets."""
    out = processor.image_processor(images=images, max_soft_tokens=max_soft_tokens, return_tensors="pt")
    patch = processor.image_processor.patch_size
    frames = []
    for pixels, pos in zip(out["pixel_values"], out["image_position_ids"]):
        valid = (pos >= 0).all(-1)
        pixels, pos = pixels[valid], pos[valid]
        w, h = int(pos[:, 0].max()) + 1, int(pos[:, 1].max()) + 1
        img = np.zeros((h * patch, w * patch, 3), dtype=np.float32)
        for (x, y), values in zip(pos.tolist(), pixels.numpy()):
            img[y * patch:(y + 1) * patch, x * patch:(x + 1) * patch] = values.reshape(patch, patch, 3)
        frames.append((img.clip(0, 1) * 255).round().astype(np.uint8))
    return frames


def frame_differences(images: list) -> list[np.ndarray]:
    """Mean absolute change between consecutive frames, per pixel (what moved, grew, faded)."""
    arrays = [as_array(im).astype(np.float32) for im in images]
    return [np.abs(b - a).mean(-1) for a, b in zip(arrays, arrays[1:])]


def plot_training_curves(log_history: list[dict]):
    """Loss and validation loss, learning rate, grad norm and samples/s against the optimizer step."""
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(h["step"], h[key]) for h in log_history if key in h]
        return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    x, y = series("loss")
    axes[0].plot(x, y, label="train (per token)")
    x, y = series("eval_loss")
    axes[0].plot(x, y, "o-", label="validation")
    axes[0].set_title("loss")
    axes[0].legend()
    for ax, key, title in zip(axes[1:], ("learning_rate", "grad_norm", "samples_per_s"),
                              ("learning rate", "grad norm", "samples / s")):
        x, y = series(key)
        ax.plot(x, y)
        ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    return fig
