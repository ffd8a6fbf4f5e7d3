#!/usr/bin/env python3
"""Measure whether generated avatars follow their prompts: hair colour, background, eyewear.

The images are expected to look like the training set made by scripts/avatars/render.mjs
(64x64 DiceBear "Adventurer" heads, always drawn at the same place). Every component of that style
sits at a fixed position, so fixed per-pixel maps say where to look: render.mjs writes them
(scripts/avatars/masks/*.png, made by rendering the same avatar twice with one attribute changed and
diffing). Colours are named by the vocabulary the data set was drawn from
(scripts/avatars/vocabulary.json), so "red hair" means the same hex value here as in training.

Inputs (one of):
  IMAGES_DIR                 PNGs with an AUTOMATIC1111-style `parameters` tEXt chunk (the prompt
                             is the text before "Negative prompt:" / the "Steps:" line)
  --jsonl FILE               JSON lines {"file": ..., "prompt": ...}; {"file_name": ..., "text": ...}
                             (the training data.jsonl) is accepted too; paths are relative to FILE
  --attributes FILE          the data set's attributes.jsonl: the truth comes from the structured
                             attributes instead of the prompt (validates this classifier)

  scripts/.venv/bin/python scripts/eval_prompt_following.py --attributes data/avatars/attributes.jsonl
  scripts/.venv/bin/python scripts/eval_prompt_following.py out/samples
  scripts/.venv/bin/python scripts/eval_prompt_following.py out/samples --grid grid.png

--grid writes a grid of the images prompted with just a hair colour ("anime girl, red hair"):
one row per hair colour, in the vocabulary's order, the first --grid-columns images of each.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64
HERE = Path(__file__).resolve().parent
DEFAULT_MASKS = HERE / "avatars" / "masks"
DEFAULT_VOCAB = HERE / "avatars" / "vocabulary.json"

# Region thresholds on the masks (0..1).
HAIR_REGION = 0.9  # pixels covered by hair in >= 90% of drawn hair styles: the crown of the head
HAIR_FREE = 0.1  # "hair rarely reaches here": border pixels for the background, sunglass lenses
FRAME_HAIR_FREE = 0.02  # glasses frames: stricter, wavy styles cover the temples in a few % of images
SKIN_HAIR_FREE = 0.05  # bare-skin reference pixels must be almost never under hair
FRAME_REGION = 0.25  # pixels that at least one of the four "glasses" frames draws on

# Eyewear decision thresholds, chosen on a calibration render with a different seed
# (node scripts/avatars/render.mjs --out /tmp/av_calib --count 2000 --seed 1), not on the data set
# this script is validated on. See scripts/avatars/README.md for the score distributions.
HAIR_MATCH = 20.0  # Lab distance within which a pixel counts as this image's hair
DARK_HAIR_L = 30.0  # hair darker than this L* can't be told from black frames by colour
DARK_RATIO = 0.6  # a frame pixel is "dark" below this fraction of the skin's luma
BLACK_RATIO = 0.35  # a lens pixel is "black" below this fraction of the skin's luma
SUNGLASSES_MIN = 0.6  # fraction of black lens pixels that means sunglasses
GLASSES_MIN = 0.17  # fraction of dark frame pixels that means glasses


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 (..., 3) -> CIE L*a*b* (D65), where Euclidean distance tracks perceived difference."""
    c = rgb.astype(np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
    )
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def hex_to_rgb(h: str) -> np.ndarray:
    return np.array([int(h[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.uint8)


class Classifier:
    def __init__(self, masks_dir: Path, vocab_path: Path):
        vocab = json.loads(vocab_path.read_text())
        self.hair_names = [e[0] for e in vocab["hair_color"]]
        self.hair_lab = srgb_to_lab(np.stack([hex_to_rgb(e[2]) for e in vocab["hair_color"]]))
        self.bg_names = [e[0] for e in vocab["background"]]
        self.bg_lab = srgb_to_lab(np.stack([hex_to_rgb(e[2]) for e in vocab["background"]]))

        def load(name: str) -> np.ndarray:
            path = masks_dir / f"{name}.png"
            try:
                m = np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255.0
            except FileNotFoundError:
                sys.exit(f"mask {path} not found: run scripts/avatars/render.mjs (see its README)")
            if m.shape != (SIZE, SIZE):
                sys.exit(f"mask {path} is {m.shape}, expected {(SIZE, SIZE)}")
            return m

        hair, glasses, sunglasses = load("hair"), load("glasses"), load("sunglasses")
        eyes, mouth, skin = load("eyes"), load("mouth"), load("skin")
        border = np.zeros((SIZE, SIZE), bool)
        border[:2, :] = border[-2:, :] = border[:, :2] = border[:, -2:] = True
        self.hair_region = hair >= HAIR_REGION
        self.border_region = border & (hair < HAIR_FREE)
        self.skin_region = (skin > 0) & (hair < SKIN_HAIR_FREE)
        # Frames away from the eyes and mouth: there a face without glasses shows plain skin.
        self.frame_region = (glasses >= FRAME_REGION) & (eyes == 0) & (mouth == 0) & (hair < FRAME_HAIR_FREE)
        # Sunglass lenses over the eyes: without them the eye whites show.
        self.lens_region = (sunglasses > 0) & (eyes > 0) & (hair < HAIR_FREE)
        for name, region in [
            ("hair", self.hair_region),
            ("border", self.border_region),
            ("skin", self.skin_region),
            ("frame", self.frame_region),
            ("lens", self.lens_region),
        ]:
            if region.sum() < 10:
                sys.exit(f"{name} region has only {region.sum()} pixels: masks in {masks_dir} look wrong")

    def classify(self, img: Image.Image) -> dict:
        img = img.convert("RGB")
        if img.size != (SIZE, SIZE):
            img = img.resize((SIZE, SIZE), Image.Resampling.BOX)
        lab = srgb_to_lab(np.asarray(img))

        # Hair: the median colour of the crown (robust to the black strand lines drawn over it).
        hair_lab = np.median(lab[self.hair_region], axis=0)
        hair = self.hair_names[int(np.argmin(np.linalg.norm(self.hair_lab - hair_lab, axis=1)))]

        # Background: every border pixel votes for its nearest named colour.
        d = np.linalg.norm(lab[self.border_region][:, None, :] - self.bg_lab[None], axis=2)
        votes = np.bincount(d.argmin(axis=1), minlength=len(self.bg_names))
        background = self.bg_names[int(votes.argmax())]

        # Eyewear. Luma in gamma space, relative to this face's own skin: the renderer blends in
        # that space, so a pixel a black line half covers has half the skin's luma on any skin tone.
        # Pixels of this image's hair colour are left out (bangs and side locks over the frames),
        # unless the hair can't be told by colour from the frames (black) or from the skin.
        luma = np.asarray(img, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
        skin_luma = max(float(np.median(luma[self.skin_region])), 1.0)
        skin_lab = np.median(lab[self.skin_region], axis=0)
        not_hair = np.ones((SIZE, SIZE), bool)
        if hair_lab[0] >= DARK_HAIR_L and np.linalg.norm(hair_lab - skin_lab) >= 2 * HAIR_MATCH:
            not_hair = np.linalg.norm(lab - hair_lab, axis=-1) > HAIR_MATCH
        frame, lens = self.frame_region & not_hair, self.lens_region & not_hair
        frame_score = float(np.mean(luma[frame] < DARK_RATIO * skin_luma)) if frame.sum() >= 5 else 0.0
        lens_score = float(np.mean(luma[lens] < BLACK_RATIO * skin_luma)) if lens.sum() >= 5 else 0.0
        if lens_score >= SUNGLASSES_MIN:
            eyewear = "sunglasses"
        elif frame_score >= GLASSES_MIN:
            eyewear = "glasses"
        else:
            eyewear = "none"
        return {
            "hair_color": hair,
            "background": background,
            "eyewear": eyewear,
            "frame_score": round(frame_score, 4),
            "lens_score": round(lens_score, 4),
        }


def parse_a1111_prompt(parameters: str) -> str:
    """The prompt of an AUTOMATIC1111 `parameters` text: everything before "Negative prompt:" and
    before the final "Steps: ..." settings line."""
    lines = parameters.split("\n")
    if len(lines) > 1 and lines[-1].startswith("Steps:"):
        lines = lines[:-1]
    text = "\n".join(lines)
    return text.split("\nNegative prompt:")[0].strip()


def expected_from_prompt(prompt: str, clf: Classifier) -> dict:
    p = prompt.lower()

    def named(names: list[str], noun: str) -> str | None:
        hits = [n for n in names if re.search(rf"\b{re.escape(n)}\s+{noun}\b", p)]
        return hits[0] if len(hits) == 1 else None  # none or contradictory: not judged

    if re.search(r"\bsunglasses\b", p):
        eyewear = "sunglasses"
    elif re.search(r"(?<!sun)\bglasses\b", p):
        eyewear = "glasses"
    else:
        eyewear = "not mentioned"
    return {
        "hair_color": named(clf.hair_names, "hair"),
        "background": named(clf.bg_names, "background"),
        "eyewear": eyewear,
    }


def load_items(args) -> list[tuple[Path, dict, str]]:
    """(image path, expected attributes, prompt) for every image."""
    items = []
    if args.attributes:
        base = args.attributes.parent
        for line in args.attributes.read_text().splitlines():
            r = json.loads(line)
            expected = {"hair_color": r["hair_color"], "background": r["background"], "eyewear": r["glasses"]}
            items.append((base / r["file_name"], expected, r["text"]))
    elif args.jsonl:
        base = args.jsonl.parent
        for line in args.jsonl.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            file = r.get("file") or r.get("file_name") or r.get("image")
            prompt = r.get("prompt") if "prompt" in r else r.get("text")
            if file is None or prompt is None:
                sys.exit(f"{args.jsonl}: line without file/prompt: {line[:120]}")
            items.append((base / file, None, prompt))
    else:
        for path in sorted(args.images.glob("*.png")):
            params = Image.open(path).text.get("parameters")
            if params is None:
                print(f"skipping {path}: no `parameters` text chunk", file=sys.stderr)
                continue
            items.append((path, None, parse_a1111_prompt(params)))
    if args.limit:
        items = items[: args.limit]
    return items


def report(title: str, rows: list[tuple[str | None, str]], order: list[str]) -> None:
    """rows: (expected, detected). Prints per expected class n and the fraction detected as expected."""
    by_class = defaultdict(Counter)
    for exp, det in rows:
        by_class[exp if exp is not None else "not mentioned"][det] += 1
    print(f"\n{title}")
    print(f"  {'prompted':<16}{'n':>6}  {'match':>7}  most common detections")
    judged = matched = 0
    for cls in order + sorted(set(by_class) - set(order)):
        c = by_class.get(cls)
        if not c:
            continue
        n = sum(c.values())
        top = ", ".join(f"{k} {v}" for k, v in c.most_common(3))
        if cls == "not mentioned":
            print(f"  {cls:<16}{n:>6}  {'-':>7}  {top}")
            continue
        ok = c[cls]
        judged += n
        matched += ok
        print(f"  {cls:<16}{n:>6}  {100 * ok / n:6.1f}%  {top}")
    if judged:
        print(f"  {'all':<16}{judged:>6}  {100 * matched / judged:6.1f}%")


def write_grid(path: Path, results: list[dict], hair_names: list[str], columns: int, scale: int) -> None:
    """One row per hair colour of the images whose whole prompt is "anime girl, <colour> hair"."""
    from PIL import ImageDraw

    rows = []
    for name in hair_names:
        files = sorted(r["file"] for r in results if r["prompt"].strip() == f"anime girl, {name} hair")
        if files:
            rows.append((name, files[:columns]))
    if not rows:
        sys.exit("--grid: no images prompted with just a hair colour")
    tile, label = SIZE * scale, 16 * scale + 48
    grid = Image.new("RGB", (label + columns * tile, len(rows) * tile), "white")
    draw = ImageDraw.Draw(grid)
    for y, (name, files) in enumerate(rows):
        draw.text((8, y * tile + tile // 2 - 6), f"{name} hair", fill="black")
        for x, file in enumerate(files):
            with Image.open(file) as img:
                grid.paste(img.convert("RGB").resize((tile, tile), Image.NEAREST), (label + x * tile, y * tile))
    grid.save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("images", nargs="?", type=Path, help="folder of PNGs with a `parameters` text chunk")
    src.add_argument("--jsonl", type=Path, help="JSON lines {file, prompt}")
    src.add_argument("--attributes", type=Path, help="attributes.jsonl of the rendered data set (ground truth)")
    ap.add_argument("--masks", type=Path, default=DEFAULT_MASKS, help=f"mask folder (default {DEFAULT_MASKS})")
    ap.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB, help=f"vocabulary (default {DEFAULT_VOCAB})")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images")
    ap.add_argument("--out-json", type=Path, help="write per-image expectations and detections here")
    ap.add_argument("--grid", type=Path, help="write a sample grid, one row per hair colour, here")
    ap.add_argument("--grid-columns", type=int, default=8)
    ap.add_argument("--grid-scale", type=int, default=2, help="nearest-neighbour upscaling of each image")
    args = ap.parse_args()

    clf = Classifier(args.masks, args.vocab)
    items = load_items(args)
    if not items:
        sys.exit("no images to evaluate")
    results = []
    for path, expected, prompt in items:
        if expected is None:
            expected = expected_from_prompt(prompt, clf)
        with Image.open(path) as img:
            detected = clf.classify(img)
        results.append({"file": str(path), "prompt": prompt, "expected": expected, "detected": detected})

    print(f"{len(results)} images; truth from {'attributes' if args.attributes else 'prompts'}")
    report("hair colour", [(r["expected"]["hair_color"], r["detected"]["hair_color"]) for r in results], clf.hair_names)
    report("background", [(r["expected"]["background"], r["detected"]["background"]) for r in results], clf.bg_names)
    report(
        "eyewear",
        [(r["expected"]["eyewear"], r["detected"]["eyewear"]) for r in results],
        ["none", "glasses", "sunglasses"],
    )
    if args.grid:
        write_grid(args.grid, results, clf.hair_names, args.grid_columns, args.grid_scale)
        print(f"\ngrid: {args.grid}")
    if args.out_json:
        args.out_json.write_text("".join(json.dumps(r) + "\n" for r in results))
        print(f"\nper-image results: {args.out_json}")


if __name__ == "__main__":
    main()
