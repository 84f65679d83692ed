"""Pictures for the notebooks: frame strips, the frames as the model sees them, motion, training curves."""

from __future__ import annotations

import textwrap

import numpy as np


def as_array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)


# Captions in points: 10 pt is 12.5 px at the notebooks' 90 dpi (8 pt was 10 px, too small to read comfortably).
CAPTION_FONTSIZE = 10


def plot_strips(rows: list[list], captions: list[str], width: float = 2.0, wrap: int | None = None):
    """One row of frames per sample, its caption(s) above the row (wrapped at `wrap` characters, by default the
    figure's width)."""
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    wrap = wrap or int(width * n_cols * 72 / (CAPTION_FONTSIZE * 0.6))  # ~0.6 em per character
    wrapped = ["\n".join(textwrap.wrap(c, wrap)) for c in captions]
    lines = max(w.count("\n") + 1 for w in wrapped)
    caption_in = 0.2 * lines + 0.1  # room above each row for its caption
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, (width + caption_in) * n_rows),
                             squeeze=False, gridspec_kw={"hspace": caption_in / width, "wspace": 0.05})
    for r, (frames, caption) in enumerate(zip(rows, wrapped)):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(frames):
                ax.imshow(as_array(frames[c]), cmap="magma" if np.ndim(frames[c]) == 2 else None)
        axes[r][0].set_title(caption, loc="left", fontsize=CAPTION_FONTSIZE)
    # the captions run across the whole row: margins by hand, since tight_layout would squeeze the first column
    height = fig.get_size_inches()[1]
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - caption_in / height)
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


def draw_patch_grid(axes, patch: int, pooling: int) -> None:
    """Over frames rebuilt by `processed_frames`: thin lines between the vision tower's patches, thick ones around
    each pooling window (`pooling` x `pooling` patches), which becomes one soft token."""
    for ax in np.ravel(axes):
        if not ax.get_images():
            continue
        h, w = ax.get_images()[0].get_array().shape[:2]
        for step, lw, alpha in ((patch, 0.3, 0.35), (patch * pooling, 1.0, 0.9)):
            for x in range(0, w + 1, step):
                ax.axvline(x - 0.5, color="white", lw=lw, alpha=alpha)
            for y in range(0, h + 1, step):
                ax.axhline(y - 0.5, color="white", lw=lw, alpha=alpha)


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
