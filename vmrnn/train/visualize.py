"""Pictures of forecasts for MLflow: a PNG strip, an animated GIF, and the per-lead-time metric curves.

Frames are (N, T, C, H, W) in [0, 1]. One channel is drawn in grey, three as RGB; other channel
counts (TaxiBJ's inflow/outflow) are drawn one channel per row.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

STRIP_FILE = "forecast_strip.png"
GIF_FILE = "forecast.gif"
LEAD_FILE = "lead_time_metrics.png"


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)


def _channel_views(frame: np.ndarray) -> list[np.ndarray]:
    """(C, H, W) -> images to draw: one RGB image, or one grey image per channel."""
    if frame.shape[0] == 3:
        return [frame.transpose(1, 2, 0)]
    return [frame[c] for c in range(frame.shape[0])]


def save_strip(inputs, targets, preds, path: str | os.PathLike, *, title: str = "") -> Path:
    """Rows per sample (and channel): inputs | targets, and inputs | predictions, one frame per column."""
    path = Path(path)
    path.write_bytes(strip_png(inputs, targets, preds, title=title))
    return path


def strip_png(inputs, targets, preds, *, title: str = "") -> bytes:
    """`save_strip`'s picture as PNG bytes (drawn in memory: no file to leave behind)."""
    import matplotlib.pyplot as plt

    fig = strip_figure(inputs, targets, preds, title=title)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=80, format="png")
    plt.close(fig)
    return buf.getvalue()


TITLE_IN = 0.35  # inches above the frames kept for the title, so that it never covers the column labels


def strip_figure(inputs, targets, preds, *, title: str = ""):
    """The matplotlib figure `save_strip` saves (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    x, y, p = _np(inputs), _np(targets), _np(preds)
    n, t_in, c = x.shape[0], x.shape[1], x.shape[2]
    t_out = y.shape[1]
    views = 1 if c == 3 else c
    rows, cols = n * 2 * views, t_in + t_out
    top = TITLE_IN if title else 0.0
    height = rows * 0.9 + 0.4 + top
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, height), squeeze=False)
    for i in range(n):
        for v in range(views):
            for kind in range(2):
                r = (i * views + v) * 2 + kind
                seq = np.concatenate([x[i], y[i] if kind == 0 else p[i]], axis=0)
                for t in range(cols):
                    ax = axes[r, t]
                    img = _channel_views(seq[t])[v]
                    ax.imshow(img, cmap=None if img.ndim == 3 else "gray", vmin=0, vmax=1, interpolation="nearest")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if t == t_in:
                        for s in ax.spines.values():
                            s.set_color("red")
                if views > 1:
                    label = f"#{i} c{v} " + ("true" if kind == 0 else "pred")
                else:
                    label = f"#{i} " + ("true" if kind == 0 else "pred")
                axes[r, 0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    for t in range(cols):
        axes[0, t].set_title(f"t{t - t_in + 1:+d}" if t >= t_in else f"in{t}", fontsize=6)
    # tight_layout ignores a suptitle: lay the frames out below a band kept for it, then put the title just
    # above the column labels (square frames sit higher in their cells than tight_layout assumes)
    fig.tight_layout(pad=0.2, rect=(0, 0, 1, 1 - top / height))
    if title:
        renderer = fig.canvas.get_renderer()
        labels_top = max(ax.title.get_window_extent(renderer).y1 for ax in axes[0])
        fig.suptitle(title, fontsize=8, y=(labels_top + 2) / fig.bbox.height, va="bottom")
    return fig


def save_gif(inputs, targets, preds, path: str | os.PathLike, *, frame_ms: int = 250, min_size: int = 96) -> Path:
    """Animated: per sample a column pair (truth | prediction), time runs through inputs then targets."""
    path = Path(path)
    path.write_bytes(forecast_gif(inputs, targets, preds, frame_ms=frame_ms, min_size=min_size))
    return path


def forecast_gif(inputs, targets, preds, *, frame_ms: int = 250, min_size: int = 96) -> bytes:
    """`save_gif`'s animation as GIF bytes (drawn in memory)."""
    from PIL import Image

    x, y, p = _np(inputs), _np(targets), _np(preds)
    n, t_in, c, h, w = x.shape
    scale = max(1, int(np.ceil(min_size / max(h, w))))
    views = 1 if c == 3 else c
    pad = 2
    frames = []
    for t in range(t_in + y.shape[1]):
        tiles_rows = []
        for i in range(n):
            truth = x[i, t] if t < t_in else y[i, t - t_in]
            pred = x[i, t] if t < t_in else p[i, t - t_in]
            row = []
            for v in range(views):
                for img in (_channel_views(truth)[v], _channel_views(pred)[v]):
                    if img.ndim == 2:
                        img = np.repeat(img[..., None], 3, axis=2)
                    img = np.kron(img, np.ones((scale, scale, 1), dtype=np.float32))
                    img = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), constant_values=(1.0 if t >= t_in else 0.3))
                    row.append(img)
            tiles_rows.append(np.concatenate(row, axis=1))
        canvas = (np.concatenate(tiles_rows, axis=0) * 255).round().astype(np.uint8)
        frames.append(Image.fromarray(canvas, mode="RGB"))
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return buf.getvalue()


def save_lead_time_plot(per_lead: dict[str, Sequence[float]], path: str | os.PathLike, *, title: str = "") -> Path:
    """One panel per metric: value against lead time (1 = first predicted frame)."""
    path = Path(path)
    path.write_bytes(lead_time_png(per_lead, title=title))
    return path


def lead_time_png(per_lead: dict[str, Sequence[float]], *, title: str = "") -> bytes:
    """`save_lead_time_plot`'s picture as PNG bytes (drawn in memory)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = [k for k, v in per_lead.items() if len(v)]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3.2 * max(1, len(names)), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        vals = list(per_lead[name])
        ax.plot(range(1, len(vals) + 1), vals, marker="o", markersize=3)
        ax.set_xlabel("lead time (frames)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=90, format="png")
    plt.close(fig)
    return buf.getvalue()
