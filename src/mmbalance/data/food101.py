"""UPMC Food-101 (Wang et al. 2015): 101 food classes, a photo plus the title of the recipe page it came from.

Raw tree, as unzipped from Kaggle ``gianmarco96/upmcfood101`` (datasets.md §1.6, §2), possibly one folder down
(``<root>/<dir>/images``)::

    <root>/images/{train,test}/<class>/<class>_<n>.jpg
    <root>/texts/{train,test}_titles.csv        rows: image_name,text,label

The Kaggle csvs have **no header**; BalanceBenchmark's loader reads the columns by name (``Image_path,text,label``
or similar), so its users added one. Both are accepted: the header is detected per file.

Modalities, in the peer's order: ``text`` (kind ``tokens``, (max_length,) int64: the title cleaned as
BalanceBenchmark does -- leading "RT", URLs and '#' dropped -- and tokenised with a BERT WordPiece tokenizer,
padding='max_length', max_length 40; ``data.text``) and ``visual`` (kind ``image``, (3, S, S): BalanceBenchmark's
recipe, ``ClipTransform(augment='rotate_flip')``). The peer stores the photo as frames with T = 1; a photo has no
time axis, and the ``image`` kind makes a kind-based backbone pick its image encoder, so ``image`` it is. Classes
are the sorted class folders of ``images/train``; splits the official train/test.

``mmbalance prepare food101`` validates the tree, writes manifest.csv + classes.json, and optionally pre-tokenises
the titles (``tokenizer=``) and caches the images (``image_size=``; data/images.py).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmbalance.data import media
from mmbalance.data.batch import DataSplits, ModalitySpec, stratified_split
from mmbalance.data.images import Images, cached_images, decode_images
from mmbalance.data.layout import dataset_root
from mmbalance.data.prepare import MANIFEST, PrepareContext, PreparedFolder, resolve_prepared
from mmbalance.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
EXPECTED = ("<root>/images/{train,test}/<class>/<image>.jpg and <root>/texts/{train,test}_titles.csv "
            "(rows image_name,text,label; header optional)")
PREPARED_META = "food101_prepared.json"
TOKENS = "tokens.npy"
TOKENS_META = "tokens.json"
COLUMNS = ["id", "label", "split", "class", "image", "text", "cache_row"]  # manifest.csv

# header names seen in public copies of the csvs (BalanceBenchmark: Image_path, text, label)
_IMAGE_COLS = ("image_path", "image_name", "image", "img", "img_path", "path", "file", "filename", "file_name")
_TEXT_COLS = ("text", "title", "titles", "recipe", "caption")
_LABEL_COLS = ("label", "food", "class", "category", "class_name")


# --------------------------------------------------------------------------------------------------- layout


@dataclass
class Record:
    """One pair: the image path relative to the dataset root, its title, its class and split."""

    id: str
    split: str
    label: int
    image: str
    text: str
    cache_row: int = -1  # row in the prepared image cache (prepared path only)


@dataclass
class Scan:
    """What was found under the root: which layout, the usable pairs, and what did not fit (counts per split)."""

    base: Path  # the folder holding images/ and texts/ (root, or one level down)
    layout: str
    classes: list[str]
    records: list[Record]
    orphan_rows: dict[str, int] = field(default_factory=dict)  # csv rows without an image
    orphan_images: dict[str, int] = field(default_factory=dict)  # images without a csv row
    unknown_label_rows: dict[str, int] = field(default_factory=dict)
    duplicate_rows: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # the image paths csv rows name but the disk lacks


def _find_base(root) -> Path:
    root = dataset_root(root, "food101")
    found = [p for p in [root, *sorted(root.iterdir())] if (p / "images").is_dir() and (p / "texts").is_dir()]
    if found and (found[0] == root or len(found) == 1):  # the root, or the archive unzipped into its own folder
        return found[0]
    missing = [str(root / d) for d in ("images", "texts") if not (root / d).is_dir()]
    raise DataError(f"food101: {', '.join(missing)} not found under {str(root)!r}; expected {EXPECTED}")


def read_titles(path: Path) -> tuple[list[tuple[str, str, str]], bool]:
    """The rows (image_name, text, label) of one titles csv and whether it had a header.

    A header is recognised by its column names (an image-path name such as Image_path, and a label name); the
    columns are then taken by name in whatever order they come. Without a header the Kaggle order
    image_name,text,label applies; a title containing unquoted commas is re-joined (the first field is the image,
    the last the label).
    """
    if not path.is_file():
        raise DataError(f"food101: titles file {str(path)!r} is missing; expected {EXPECTED}")
    try:
        with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
            rows = [r for r in csv.reader(f) if r and any(x.strip() for x in r)]
    except (OSError, csv.Error) as exc:
        raise DataError(f"food101: cannot read {str(path)!r} as csv: {exc}") from None
    if not rows:
        raise DataError(f"food101: {str(path)!r} has no rows; expected image_name,text,label rows")
    first = rows[0]
    low = [h.strip().lower().lstrip("\ufeff") for h in first]
    i_img, i_txt, i_lab = (next((low.index(n) for n in names if n in low), None)
                           for names in (_IMAGE_COLS, _TEXT_COLS, _LABEL_COLS))
    if first[0].strip().lower().endswith(media.IMAGE_SUFFIXES) or i_img is None or i_lab is None:  # no header
        for n, r in enumerate(rows, start=1):
            if len(r) < 3:
                raise DataError(f"food101: {str(path)!r} line {n} has {len(r)} field(s); expected "
                                "image_name,text,label")
        return [(r[0].strip(), ",".join(r[1:-1]), r[-1].strip()) for r in rows], False
    if i_txt is None:
        raise DataError(f"food101: {str(path)!r} has a header {first} without a text/title column")
    for n, r in enumerate(rows[1:], start=2):
        if len(r) <= max(i_img, i_txt, i_lab):
            raise DataError(f"food101: {str(path)!r} line {n} has {len(r)} fields; the header has {len(first)}")
    return [(r[i_img].strip(), r[i_txt], r[i_lab].strip()) for r in rows[1:]], True


def scan(root: str | Path) -> Scan:
    """Detect the layout under `root` and match csv rows to image files (no image is decoded here)."""
    root = dataset_root(root, "food101")
    base = _find_base(root)
    images = base / "images"
    for split in SPLITS:
        if not (images / split).is_dir():
            raise DataError(f"food101: image folder {str(images / split)!r} is missing; expected {EXPECTED}")
    classes = sorted(d.name for d in os.scandir(images / "train") if d.is_dir())
    if not classes:
        raise DataError(f"food101: {str(images / 'train')!r} has no class folders; expected {EXPECTED}")
    stray = sorted(d.name for d in os.scandir(images / "test") if d.is_dir() and d.name not in classes)
    if stray:
        raise DataError(f"food101: {str(images / 'test')!r} has class folders absent from images/train: "
                        f"{stray[:5]}; the class map comes from images/train")
    index = {c: i for i, c in enumerate(classes)}
    result, headers = Scan(base, "", classes, []), {}
    for split in SPLITS:
        rows, headers[split] = read_titles(base / "texts" / f"{split}_titles.csv")
        on_disk = {c: {e.name for e in os.scandir(images / split / c) if e.is_file() and e.name.lower().endswith(
            media.IMAGE_SUFFIXES)} if (images / split / c).is_dir() else set() for c in classes}
        used: set[tuple[str, str]] = set()
        orphan = unknown = dup = 0
        found = []
        for image, text, label in rows:
            name = os.path.basename(image.replace("\\", "/"))
            if label not in index:
                unknown += 1
            elif name not in on_disk[label]:
                orphan += 1
                result.missing.append(str(images / split / label / name))
            elif (label, name) in used:
                dup += 1
            else:
                used.add((label, name))
                found.append(Record(f"{split}/{label}/{name}", split, index[label],
                                    f"{os.path.relpath(base, root)}/images/{split}/{label}/{name}".removeprefix("./"),
                                    text))
        if not found:
            raise DataError(f"food101: no {split} pair found: none of the {len(rows)} rows of "
                            f"{str(base / 'texts' / f'{split}_titles.csv')!r} names an image that exists under "
                            f"{str(images / split)!r} in its class folder")
        result.records += sorted(found, key=lambda r: (r.label, media.natural_key(r.id)))  # independent of csv order
        result.orphan_rows[split], result.unknown_label_rows[split], result.duplicate_rows[split] = orphan, unknown, dup
        result.orphan_images[split] = sum(len(v) for v in on_disk.values()) - len(used)
    kinds = {s: "header" if h else "headerless" for s, h in headers.items()}
    if len(set(kinds.values())) == 1:
        result.layout = "balancebenchmark (csv with header)" if headers["train"] else "kaggle (headerless csv)"
    else:
        result.layout = "mixed (" + ", ".join(f"{s}: {k}" for s, k in kinds.items()) + ")"
    if base != root:
        result.layout += f", nested in {base.name}/"
    return result


# --------------------------------------------------------------------------------------------------- dataset


class Food101Dataset(Dataset):
    """One split: item i = {"inputs": {"text": (L,) int64, "visual": (3, S, S) float}, "label", "index"}; the
    image from the prepared cache or decoded (data/images.py), through BalanceBenchmark's FOOD-101 recipe."""

    def __init__(self, images: Images, tokens: np.ndarray, labels: np.ndarray, train: bool):
        self.images, self.paths, self.labels = images, images.paths, np.asarray(labels, dtype=np.int64)
        self.tokens = torch.as_tensor(np.ascontiguousarray(tokens), dtype=torch.long)
        self.transform = media.ClipTransform(size=images.size, train=bool(train), augment="rotate_flip")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        visual = self.transform([self.images[i]])[0]
        return {"inputs": {"text": self.tokens[i], "visual": visual}, "label": int(self.labels[i]), "index": i}


# --------------------------------------------------------------------------------------------------- builder


def build_food101(root: str, prepared: str | None = None, image_size: int = 224, tokenizer: str = "bert-base-uncased",
                  max_length: int = 40, clean_text: bool = True, val_fraction: float = 0.1, split_seed: int = 0,
                  use_cache: bool = True) -> DataSplits:
    """UPMC Food-101 as DataSplits (text tokens + visual image), BalanceBenchmark's FOOD-101 recipe.

    ``root``: the raw tree. ``prepared``: the folder `mmbalance prepare food101` wrote ('auto': ROOT/
    mmbalance_prepared once prepare finished there); its pre-tokenised ids are used when they were made with the
    same tokenizer, max_length and cleaning (else the titles are tokenised now), its image cache when
    ``use_cache`` and it was made at ``image_size``. ``tokenizer``: a hub name in the local Hugging Face cache, a
    tokenizer folder or a vocab.txt (must match the text encoder's model).
    """
    from mmbalance.data.text import Tokenizer, clean_text as clean

    size = int(image_size)
    if size < 8:
        raise DataError(f"food101: image_size must be >= 8, got {image_size}")
    root_path = Path(root).expanduser()
    prep = resolve_prepared(root_path, prepared)
    if prep is not None:
        source = f"prepared {prep}"
        records, classes, meta = _records_from_prepared(prep)
        layout = meta.get("layout", "prepared")
        extra = {k: meta.get(k) for k in ("orphan_rows", "orphan_images", "unreadable")}
    else:
        source = "raw tree"
        found = scan(root_path)
        records, classes, layout = found.records, found.classes, found.layout
        extra = {"orphan_rows": found.orphan_rows, "orphan_images": found.orphan_images,
                 "unreadable": "not checked on the raw path (run `mmbalance prepare food101`)"}
    tok = Tokenizer(tokenizer, max_length=max_length)
    tokens = None if prep is None else _prepared_tokens(prep, tok, bool(clean_text), len(records))
    tokens_source = "tokenised at load" if tokens is None else str(prep / TOKENS)
    if tokens is None:
        tokens = tok([clean(r.text) if clean_text else r.text for r in records])
    cache = cached_images(prep, meta.get("candidates_sha1"), size) if (prep is not None and use_cache) else None
    if cache is None and not root_path.is_dir():
        raise DataError(f"food101: dataset root {str(root_path)!r} is not a folder (the images are read from it)")

    # no finite-input check (data/finite.py) here: uint8 images and int64 token ids cannot hold NaN or Inf
    labels = np.array([r.label for r in records], dtype=np.int64)
    split, cache_rows = np.array([r.split for r in records]), np.array([r.cache_row for r in records], dtype=np.int64)
    train_all = np.flatnonzero(split == "train")
    keep, held = stratified_split(labels[train_all], val_fraction, split_seed)
    index = {"train": train_all[keep], "val": train_all[held], "test": np.flatnonzero(split == "test")}
    datasets = {s: Food101Dataset(Images([str(root_path / records[i].image) for i in idx], size, "food101", cache,
                                         cache_rows[idx]), tokens[idx], labels[idx], s == "train")
                for s, idx in index.items()}
    notes = {"layout": layout, "source": source, "root": str(root_path), "tokens": tokens_source,
             "tokenizer": tok.name, "max_length": tok.max_length, "clean_text": bool(clean_text),
             "image_size": size, "image_cache": cache[0] if cache else None,
             **{k: v for k, v in extra.items() if v is not None}, "pairs": {s: int(len(v)) for s, v in index.items()}}
    log.info("food101: %s (%s); %d classes; pairs %s; csv rows without image %s, images without row %s; "
             "tokens %s; image cache %s", layout, source, len(classes), notes["pairs"], extra.get("orphan_rows"),
             extra.get("orphan_images"), tokens_source, notes["image_cache"] or "none")
    modalities = {"text": ModalitySpec("tokens", (tok.max_length,)), "visual": ModalitySpec("image", (3, size, size))}
    return DataSplits(datasets["train"], datasets["val"], datasets["test"], modalities, len(classes), list(classes),
                      val_source=f"carved from train (stratified, {val_fraction:.0%}, seed {split_seed})", notes=notes)


def _sha1_file(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _records_from_prepared(prep: Path) -> tuple[list[Record], list[str], dict]:
    folder = PreparedFolder(prep, "food101").require()
    rows, classes, meta = folder.rows(), folder.classes(), folder.json(PREPARED_META, optional=True)
    records = []
    for n, r in enumerate(rows, start=2):
        try:
            rec = Record(r["id"], r["split"], int(r["label"]), r["image"], r["text"], int(r["cache_row"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"food101: {prep / MANIFEST} line {n}: expected {','.join(COLUMNS)} ({exc}); re-run "
                            "`mmbalance prepare food101 --force`") from None
        if not 0 <= rec.label < len(classes) or rec.split not in SPLITS:
            raise DataError(f"food101: {prep / MANIFEST} line {n}: label {rec.label} / split {rec.split!r} out of "
                            "range")
        records.append(rec)
    if not (prep / PREPARED_META).is_file():
        log.warning("food101: %s is missing; the image cache is not used", prep / PREPARED_META)
    return records, classes, meta


def _tokens_meta(tok, clean_text: bool, manifest: Path, rows: int) -> dict:
    """What the stored ids were made from: they are valid for this tokenizer, cleaning and manifest only."""
    return {"tokenizer": tok.name, "fingerprint": tok.fingerprint, "max_length": tok.max_length,
            "clean_text": clean_text, "manifest_sha1": _sha1_file(manifest), "rows": rows}


def _prepared_tokens(prep: Path, tok, clean_text: bool, n: int) -> np.ndarray | None:
    """The pre-tokenised ids when they were made from this manifest with this tokenizer and cleaning."""
    folder = PreparedFolder(prep, "food101")
    if not ((prep / TOKENS_META).is_file() and (prep / TOKENS).is_file()):
        return None
    meta, want = folder.json(TOKENS_META), _tokens_meta(tok, clean_text, prep / MANIFEST, n)
    if any(meta.get(k) != want[k] for k in ("fingerprint", "clean_text", "manifest_sha1")):
        log.info("food101: %s was made with another tokenizer/max_length/cleaning or manifest; tokenising now",
                 prep / TOKENS)
        return None
    ids = folder.array(TOKENS)
    return np.asarray(ids, dtype=np.int64) if ids.shape == (n, tok.max_length) else None


# --------------------------------------------------------------------------------------------------- prepare


def prepare(ctx: PrepareContext, image_size: int | None = None, tokenizer: str | None = None,
            max_length: int = 40, clean_text: bool = True, check_images: bool = True, block: int = 4096) -> dict:
    """Validate the Food-101 tree and write the prepared folder: manifest.csv (`COLUMNS`), classes.json and the
    orphan counts. ``check_images``: decode every image and leave unreadable ones out (reported); ``image_size=S``:
    also cache the images at S x S (224 px: ~13.6 GB for 90k pairs); ``tokenizer``: also pre-tokenise the titles
    into tokens.npy (max_length, clean_text as the loader's). A finished stage is skipped unless --force."""
    found = scan(ctx.root)
    candidates_sha1 = hashlib.sha1("\n".join(r.id for r in found.records).encode()).hexdigest()
    for path in found.missing:
        ctx.problem(path, "named in the titles csv but not on disk (csv row without an image)")
    size = int(image_size) if image_size else None
    if size is not None and size < 8:
        raise DataError(f"food101 prepare: image_size must be >= 8, got {image_size}")
    bad, cache_file = {}, None
    if check_images or size:
        paths = [str(ctx.root / r.image) for r in found.records]
        bad, cache_file = decode_images(ctx, paths, candidates_sha1, size, max(1, int(block)))
        for row, why in sorted(bad.items()):
            ctx.problem(paths[row], why)
    rows = [{"id": r.id, "label": r.label, "split": r.split, "class": found.classes[r.label], "image": r.image,
             "text": r.text, "cache_row": i} for i, r in enumerate(found.records) if i not in bad]
    ctx.folder.write_manifest(rows, COLUMNS)
    ctx.folder.write_classes(found.classes)
    summary = {"layout": found.layout, "clips": len(rows), **{s: sum(r["split"] == s for r in rows) for s in SPLITS},
               "classes": len(found.classes), "orphan_rows": found.orphan_rows, "orphan_images": found.orphan_images,
               "unknown_label_rows": found.unknown_label_rows, "duplicate_rows": found.duplicate_rows,
               "unreadable": len(bad) if (check_images or size) else "not checked", "image_cache": cache_file,
               "tokens": None}
    ctx.folder.write_json(PREPARED_META, {**{k: summary[k] for k in ("layout", "orphan_rows", "orphan_images",
                                                                       "unreadable")},
                                          "candidates_sha1": candidates_sha1, "base": str(found.base)})
    if tokenizer:
        from mmbalance.data.text import Tokenizer, clean_text as clean

        tok = Tokenizer(tokenizer, max_length=int(max_length))
        meta = _tokens_meta(tok, bool(clean_text), ctx.out / MANIFEST, len(rows))
        if ctx.force or not (ctx.out / TOKENS).is_file() or ctx.folder.json(TOKENS_META, optional=True) != meta:
            ctx.folder.write_array(TOKENS, tok([clean(r["text"]) if clean_text else r["text"] for r in rows]))
            ctx.folder.write_json(TOKENS_META, meta)
        summary["tokens"] = str(ctx.out / TOKENS)
    return summary
