"""Template thumbnails: example_workflows/<name>.jpg, drawn from the UI-format graph itself.

ComfyUI's template browser (frontends 1.32 to 1.49) shows `/api/workflow_templates/<pack>/<name>.jpg`
on a custom-node template's card, next to the file name as title. The thumbnail is the graph's
layout in miniature (nodes in their colours at their positions, the links between them, the pack's
nodes highlighted) under a caption with the family and what the workflow does, so cards tell the
templates apart at a glance. Small (THUMB_SIZE, JPEG quality QUALITY, a few kB each): the registry
archive carries every one of them.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

THUMB_SIZE = (320, 240)
QUALITY = 70
MAX_BYTES = 8_000                  # per thumbnail (tests/test_workflows.py): the archive carries them all
CAPTION_HEIGHT = 72
BACKGROUND = (32, 32, 32)
CAPTION_BACKGROUND = (24, 24, 28)
NODE_BODY = (53, 53, 53)
NODE_TITLE = (70, 70, 70)
PACK_TITLE = (64, 80, 140)         # the pack's nodes (cnr_id probe-select)
NOTE_BODY = (101, 83, 51)
LINK = (140, 140, 140)
FONT_FILES = ("DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
TITLE_BAR = 30


def _font(size: int):
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _rgb(color: str, default: tuple) -> tuple:
    """LiteGraph colours are '#rgb' or '#rrggbb'."""
    if not isinstance(color, str) or not color.startswith("#"):
        return default
    digits = color[1:]
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    try:
        return tuple(int(digits[i:i + 2], 16) for i in (0, 2, 4))
    except ValueError:
        return default


def caption(name: str) -> tuple[str, str]:
    """('SD1.5', 'pick by hand x0 previews') from 'SD1.5_pick_by_hand_x0_previews'."""
    family, _, what = name.partition("_")
    return family, what.replace("_", " ")


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def thumbnail(ui: dict, name: str) -> bytes:
    """The JPEG bytes of one template's thumbnail."""
    width, height = THUMB_SIZE
    image = Image.new("RGB", THUMB_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    nodes = ui["nodes"]
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_BAR, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes}
    left, top = min(b[0] for b in boxes.values()), min(b[1] for b in boxes.values())
    right, bottom = max(b[2] for b in boxes.values()), max(b[3] for b in boxes.values())
    margin, graph_height = 10, height - CAPTION_HEIGHT
    scale = min((width - 2 * margin) / (right - left), (graph_height - 2 * margin) / (bottom - top))
    dx = (width - (right - left) * scale) / 2 - left * scale
    dy = (graph_height - (bottom - top) * scale) / 2 - top * scale

    def at(x: float, y: float) -> tuple[float, float]:
        return x * scale + dx, y * scale + dy

    by_id = {n["id"]: n for n in nodes}
    for _link_id, source, source_slot, target, target_slot, _type in ui["links"]:
        s, t = boxes[source], boxes[target]
        start = at(s[2], s[1] + TITLE_BAR + 20 * (source_slot + 1))
        end = at(t[0], t[1] + TITLE_BAR + 20 * (target_slot + 1))
        draw.line([start, end], fill=LINK, width=1)
    for node_id, (x0, y0, x1, y1) in boxes.items():
        node = by_id[node_id]
        note = node["type"] in ("MarkdownNote", "Note")
        ours = (node.get("properties") or {}).get("cnr_id") == "probe-select"
        body = _rgb(node.get("bgcolor"), NOTE_BODY if note else NODE_BODY)
        title = _rgb(node.get("color"), PACK_TITLE if ours else NODE_TITLE)
        a, b = at(x0, y0), at(x1, y1)
        draw.rounded_rectangle([a, b], radius=3, fill=body, outline=PACK_TITLE if ours else None)
        draw.rectangle([a, (b[0], min(b[1], a[1] + TITLE_BAR * scale))], fill=title)

    _draw_caption(draw, name)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=QUALITY, optimize=True)
    return out.getvalue()


def _draw_caption(draw: ImageDraw.ImageDraw, name: str) -> None:
    width, height = THUMB_SIZE
    graph_height = height - CAPTION_HEIGHT
    family, what = caption(name)
    draw.rectangle([0, graph_height, width, height], fill=CAPTION_BACKGROUND)
    big, small = _font(22), _font(15)
    draw.text((10, graph_height + 6), family, font=big, fill=(235, 235, 235))
    for i, line in enumerate(_wrap(what, small, width - 20, draw)[:2]):
        draw.text((10, graph_height + 34 + 17 * i), line, font=small, fill=(200, 200, 210))


def picture_thumbnail(picture: Path, name: str, max_bytes: int = MAX_BYTES) -> bytes:
    """The JPEG bytes of a thumbnail that shows a picture (the output of an analysis template) above
    the same caption; the quality steps down from QUALITY until the file is under ``max_bytes``."""
    width, height = THUMB_SIZE
    image = Image.new("RGB", THUMB_SIZE, (255, 255, 255))
    with Image.open(picture) as source:
        shown = source.convert("RGB")
    shown.thumbnail((width, height - CAPTION_HEIGHT), Image.LANCZOS)
    image.paste(shown, ((width - shown.width) // 2, (height - CAPTION_HEIGHT - shown.height) // 2))
    _draw_caption(ImageDraw.Draw(image), name)
    for quality in range(QUALITY, 9, -10):
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality, optimize=True)
        if out.tell() < max_bytes:
            break
    return out.getvalue()


def thumbnail_path(ui_path: Path) -> Path:
    return ui_path.with_suffix(".jpg")
