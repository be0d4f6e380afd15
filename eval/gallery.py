"""An HTML gallery: images with the model's predictions and the references, in one file."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } .metrics { margin-bottom: 20px; color: #444; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 14px; }
figure { margin: 0; padding: 10px; border: 1px solid #ddd; border-radius: 8px; background: #fafafa; }
figure.wrong { border-color: #e0a0a0; background: #fff6f6; } figure.right { border-color: #9fd29f; }
img { width: 100%; image-rendering: pixelated; border-radius: 4px; }
.strip { display: flex; gap: 3px; } .strip img { width: calc(20% - 3px); }
.q { font-weight: 600; margin-top: 6px; } .pred { margin-top: 4px; } .ref { color: #666; font-size: 13px; }
.history { color: #555; font-size: 12px; margin-top: 4px; } .toggle { margin-bottom: 14px; }
figure.wrong .pred::after { content: "  ✗"; color: #c03030; font-weight: 600; }
#mistakes:checked ~ .grid figure:not(.wrong) { display: none; }
"""


def thumbnail(image: Image.Image, size: int = 192) -> str:
    """A PNG data URL of the image scaled to ``size`` pixels wide."""
    scale = size / max(image.size)
    resized = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST
    )
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_gallery(
    path: str | Path, title: str, items: Sequence[dict[str, Any]], metrics: dict[str, Any] | None = None
) -> None:
    """Writes ``items`` (``image`` or ``images`` (PIL, optional), ``prediction``, and
    ``question``, ``history`` (earlier turns), ``references`` / ``answers``, ``correct`` when
    known) as a self-contained HTML page. Wrong predictions are marked, and a checkbox shows
    the mistakes only."""
    cards = []
    for item in items:
        verdict = {True: " right", False: " wrong"}.get(item.get("correct"), "")
        parts = [f'<figure class="{verdict.strip()}">']
        alt = html.escape(item.get("name", ""))
        if item.get("images"):
            thumbs = "".join(f'<img src="{thumbnail(im, 96)}" alt="{alt}">' for im in item["images"])
            parts.append(f'<div class="strip">{thumbs}</div>')
        elif item.get("image") is not None:
            parts.append(f'<img src="{thumbnail(item["image"])}" alt="{alt}">')
        for turn in item.get("history") or []:
            parts.append(f'<div class="history">{html.escape(turn)}</div>')
        if item.get("question"):
            parts.append(f'<div class="q">Q: {html.escape(item["question"])}</div>')
        parts.append(f'<div class="pred">→ {html.escape(item["prediction"])}</div>')
        refs = item.get("answers") or item.get("references") or []
        if refs:
            label = "answers" if item.get("answers") else "references"
            parts.append(f'<div class="ref">{label}: {html.escape(" | ".join(refs))}</div>')
        parts.append("</figure>")
        cards.append("".join(parts))
    summary = ""
    if metrics:
        shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        summary = f'<div class="metrics">{html.escape(shown)}</div>'
    wrong = sum(item.get("correct") is False for item in items)
    toggle = (
        f"<input type='checkbox' id='mistakes'><label class='toggle' for='mistakes'> show the "
        f"mistakes only ({wrong} of {len(items)})</label>"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{summary}"
        f"{toggle}<div class='grid'>{''.join(cards)}</div></body></html>"
    )
    Path(path).write_text(page, encoding="utf-8")
