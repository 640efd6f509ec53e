"""A synthetic shapes data set that can prove a tiny tokenizer learns, with no downloads.

Each image shows one shape (circle, square, triangle, cross) of one colour, size and position on a
plain or two-tone background, at a random resolution and aspect ratio. The answer states exactly
those four attributes from a small fixed vocabulary, so held-out caption accuracy measures how much
the codes carry: chance is 1/4 for the shape, 1/6 for the colour, 1/2 for the size, 1/5 for the
position. Files are written in the training format (``viq.data.conversations``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageDraw

from viq.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "white": (245, 245, 245), "black": (25, 25, 25)}
#: shape side as a fraction of the image's shorter side; large shapes still fit at any position.
SIZES = {"small": 0.26, "large": 0.48}
#: shape centre as fractions of (width, height).
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27),
             "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
           "bottom": "at the bottom", "center": "in the center"}
#: muted background colours, none of them equal to a shape colour.
BACKGROUNDS = {"gray": (128, 128, 128), "slate": (70, 90, 110), "sand": (200, 180, 140),
               "teal": (40, 110, 110), "plum": (110, 70, 120), "olive": (120, 120, 60)}
QUESTIONS = ("What shape is shown?", "Describe the image.", "What do you see in the picture?")


@dataclass(frozen=True)
class ShapeAttributes:
    shape: str
    colour: str
    size: str
    position: str


def caption(a: ShapeAttributes) -> str:
    """``A large red circle on the left.``"""
    return f"A {a.size} {a.colour} {a.shape} {PHRASES[a.position]}."


def parse_caption(text: str) -> Optional[ShapeAttributes]:
    """The attributes a (generated) caption states; None when any of them is missing or ambiguous."""
    words = re.findall(r"\w+", text.lower())
    found = []
    for values in (SHAPES, COLOURS, SIZES, POSITIONS):
        hits = [w for w in words if w in values]
        if len(set(hits)) != 1:
            return None
        found.append(hits[0])
    return ShapeAttributes(*found)


def caption_vocabulary() -> list[str]:
    """Every word and punctuation mark a question or caption can contain (sorted)."""
    texts = [*QUESTIONS, "A .", *SHAPES, *COLOURS, *SIZES, *PHRASES.values()]
    return sorted({tok for t in texts for tok in re.findall(r"\w+|[^\w\s]", t)})


def draw_shape(width: int, height: int, attrs: ShapeAttributes, rng: np.random.Generator,
               background=(128, 128, 128), second=None, split: tuple[str, float] = ("h", 0.5)) -> Image.Image:
    """Render one image; with ``second``, the background is two-tone, split ``h``orizontally or ``v``."""
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    if second is not None:
        direction, f = split
        box = (0, int(height * f), width, height) if direction == "h" else (int(width * f), 0, width, height)
        draw.rectangle(box, fill=second)
    short = min(width, height)
    side = SIZES[attrs.size] * short
    fx, fy = POSITIONS[attrs.position]
    jitter = rng.uniform(-0.02, 0.02, size=2) * short  # small, so positions stay unambiguous
    cx, cy = fx * width + jitter[0], fy * height + jitter[1]
    h = side / 2
    x0, y0, x1, y1 = cx - h, cy - h, cx + h, cy + h
    colour = COLOURS[attrs.colour]
    if attrs.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif attrs.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif attrs.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    else:  # cross: two bars a third of the side thick
        t = side / 6
        draw.rectangle((x0, cy - t, x1, cy + t), fill=colour)
        draw.rectangle((cx - t, y0, cx + t, y1), fill=colour)
    return img


@dataclass(frozen=True)
class ShapesDataset:
    root: Path
    train: Path
    val: Path
    n_train: int
    n_val: int


def make_shapes_dataset(out_dir: Union[str, Path], n_train: int = 2000, n_val: int = 200, seed: int = 0,
                        min_side: int = 48, max_side: int = 128, resize: Optional[str] = "96x32",
                        two_tone: float = 0.5) -> ShapesDataset:
    """Write ``images/{train,val}/*.png`` and ``train.jsonl`` / ``val.jsonl`` under out_dir.

    Deterministic for a seed. Sides are drawn independently from [min_side, max_side] (not aligned
    to the patch). ``resize`` is each image's ``"<base>x<patch>"`` entry (None leaves it out, so the
    recipe's default applies); ``two_tone`` is the share of split backgrounds.
    """
    if not 16 <= min_side <= max_side:
        raise ConfigError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    if n_train < 0 or n_val < 0:
        raise ConfigError("n_train and n_val must be >= 0")
    root = Path(out_dir)
    paths = {}
    for split, n, stream in (("train", n_train, 0), ("val", n_val, 1)):
        rng = np.random.default_rng([seed, stream])
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            lines.append(json.dumps(_make_sample(root, split, i, rng, min_side, max_side, resize, two_tone)))
        paths[split] = root / f"{split}.jsonl"
        paths[split].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return ShapesDataset(root, paths["train"], paths["val"], n_train, n_val)


def _make_sample(root: Path, split: str, i: int, rng: np.random.Generator, min_side: int, max_side: int,
                 resize: Optional[str], two_tone: float) -> dict:
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    attrs = ShapeAttributes(pick(SHAPES), pick(list(COLOURS)), pick(list(SIZES)), pick(list(POSITIONS)))
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    names = list(BACKGROUNDS)
    first, second, cut, bg_name = pick(names), None, ("h", 0.5), None
    if rng.random() < two_tone:
        second = pick([n for n in names if n != first])
        cut, bg_name = (pick(("h", "v")), float(rng.uniform(0.3, 0.7))), f"{first}/{second}"
    rel = f"images/{split}/{i:06d}.png"
    img = draw_shape(width, height, attrs, rng, BACKGROUNDS[first], second and BACKGROUNDS[second], cut)
    img.save(root / rel, format="PNG")
    image = {"img_path": rel}
    if resize is not None:
        image["resize"] = resize
    return {
        "id": f"{split}-{i:06d}",
        "image": [image],
        "conversations": [{"from": "human", "value": f"<image>\n{pick(QUESTIONS)}"},
                          {"from": "gpt", "value": caption(attrs)}],
        "meta": {**asdict(attrs), "width": width, "height": height, "background": bg_name or first},
    }
