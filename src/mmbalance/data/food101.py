"""UPMC Food-101 (Wang et al. 2015): 101 food classes, a photo plus the title of the recipe page it came from.

The raw tree (Kaggle ``gianmarco96/upmcfood101``, titles csv with or without a header) or the folder
``mmbalance prepare food101`` writes, as ``text`` tokens (the cleaned title, data/text.py) and a ``visual`` image
(data/images.py), with BalanceBenchmark's FOOD-101 recipe.

Reference (layouts, titles, tokenizer, the prepared cache): docs/datasets.md#upmc-food-101-food101
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from torch.utils.data import Dataset

from mmbalance.constraints import Fraction, NonNegativeInt, PositiveInt, Range
from mmbalance.data import media
from mmbalance.data.batch import DataSplits, ModalitySpec, carved_val_source, stratified_split
from mmbalance.data.images import Images, cached_images, decode_images
from mmbalance.data.layout import dataset_root
from mmbalance.data.prepare import MANIFEST, PrepareContext, PreparedFolder, record_listing, resolve_prepared
from mmbalance.data.text import Tokenizer, clean_text as clean_title
from mmbalance.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
EXPECTED = ("<root>/images/{train,test}/<class>/<image>.jpg and <root>/texts/{train,test}_titles.csv "
            "(rows image_name,text,label; header optional)")
PREPARED_META = "food101_prepared.json"
TOKENS = "tokens.npy"
TOKENS_META = "tokens.json"
COLUMNS = ["id", "label", "split", "class", "image", "text", "cache_row"]  # manifest.csv
# the ranges of the builder's and prepare's options (config validation, `mmbalance prepare --set`)
ImageSize = Annotated[int, Range(ge=8)]
MaxLength = Annotated[int, Range(ge=2)]  # room for [CLS] and [SEP] (text.Tokenizer)

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


def _find_base(root: Path) -> Path:
    found = [p for p in [root, *sorted(root.iterdir())] if (p / "images").is_dir() and (p / "texts").is_dir()]
    if found and (found[0] == root or len(found) == 1):  # the root, or the archive unzipped into its own folder
        return found[0]
    missing = [str(root / d) for d in ("images", "texts") if not (root / d).is_dir()]
    raise DataError(f"food101: {', '.join(missing)} not found under {str(root)!r}; expected {EXPECTED}")


def read_titles(path: Path) -> tuple[list[tuple[str, str, str]], bool]:
    """The rows (image_name, text, label) of one titles csv and whether it had a header (the rules:
    docs/datasets.md, "The titles csv")."""
    if not path.is_file():
        raise DataError(f"food101: titles file {str(path)!r} is missing; expected {EXPECTED}")
    record_listing(path)
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
    found = Scan(base, "", classes, [])
    header = {split: _match_split(found, split, prefix="" if base == root else f"{base.name}/") for split in SPLITS}
    if header["train"] == header["test"]:
        found.layout = "balancebenchmark (csv with header)" if header["train"] else "kaggle (headerless csv)"
    else:
        found.layout = "mixed (" + ", ".join(f"{s}: {'header' if h else 'headerless'}" for s, h in header.items()) + ")"
    if base != root:
        found.layout += f", nested in {base.name}/"
    return found


def _match_split(found: Scan, split: str, prefix: str) -> bool:
    """Add one split's pairs (csv rows whose image is in its class folder) and its counts to `found`; return
    whether its csv had a header. `prefix`: the path of found.base under the dataset root."""
    images, titles = found.base / "images" / split, found.base / "texts" / f"{split}_titles.csv"
    rows, header = read_titles(titles)
    on_disk = {c: _image_names(images / c) for c in found.classes}
    index = {c: i for i, c in enumerate(found.classes)}
    pairs: dict[tuple[str, str], Record] = {}
    orphan = unknown = duplicate = 0
    for image, text, label in rows:
        name = os.path.basename(image.replace("\\", "/"))
        if label not in index:
            unknown += 1
        elif name not in on_disk[label]:
            orphan += 1
            found.missing.append(str(images / label / name))
        elif (label, name) in pairs:
            duplicate += 1
        else:
            pairs[label, name] = Record(f"{split}/{label}/{name}", split, index[label],
                                        f"{prefix}images/{split}/{label}/{name}", text)
    if not pairs:
        raise DataError(f"food101: no {split} pair found: none of the {len(rows)} rows of {str(titles)!r} names an "
                        f"image that exists under {str(images)!r} in its class folder")
    found.records += sorted(pairs.values(), key=lambda r: (r.label, media.natural_key(r.id)))  # not the csv order
    found.orphan_rows[split], found.unknown_label_rows[split], found.duplicate_rows[split] = orphan, unknown, duplicate
    found.orphan_images[split] = sum(len(names) for names in on_disk.values()) - len(pairs)
    return header


def _image_names(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(media.IMAGE_SUFFIXES)}


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


def build_food101(root: str, prepared: str | None = None, image_size: ImageSize = 224,
                  tokenizer: str = "bert-base-uncased", max_length: MaxLength = 40,
                  clean_text: bool = True, val_fraction: Fraction = 0.1, split_seed: NonNegativeInt = 0,
                  use_cache: bool = True) -> DataSplits:
    """UPMC Food-101 as DataSplits (text tokens + visual image), BalanceBenchmark's FOOD-101 recipe, from the raw
    tree ``root`` or the folder `mmbalance prepare food101` wrote (``prepared``; docs/datasets.md, "Loading")."""
    size = _image_size(image_size, "food101")
    root_path = Path(root).expanduser()
    prep = resolve_prepared(root_path, prepared, "food101")
    folder = None if prep is None else PreparedFolder(prep, "food101").require()
    if folder is None:
        found = scan(root_path)
        records, classes, layout, source = found.records, found.classes, found.layout, "raw tree"
        counts = {"orphan_rows": found.orphan_rows, "orphan_images": found.orphan_images,
                  "unreadable": "not checked on the raw path (run `mmbalance prepare food101`)"}
    else:
        records, classes, meta = _records_from_prepared(folder)
        layout, source = meta.get("layout", "prepared"), f"prepared {prep}"
        counts = {k: meta[k] for k in ("orphan_rows", "orphan_images", "unreadable") if meta.get(k) is not None}
    tok = Tokenizer(tokenizer, max_length=max_length)
    tokens = None if folder is None else _prepared_tokens(folder, tok, bool(clean_text), len(records))
    tokens_source = "tokenised at load" if tokens is None else str(prep / TOKENS)
    if tokens is None:
        tokens = _tokenise(tok, [r.text for r in records], clean_text)
    cache = cached_images(prep, meta.get("candidates_sha1"), size) if (folder and use_cache) else None
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
             "image_size": size, "image_cache": cache[0] if cache else None, **counts,
             "pairs": {s: int(len(v)) for s, v in index.items()}}
    log.info("food101: %s (%s); %d classes; pairs %s; csv rows without image %s, images without row %s; "
             "tokens %s; image cache %s", layout, source, len(classes), notes["pairs"], counts.get("orphan_rows"),
             counts.get("orphan_images"), tokens_source, notes["image_cache"] or "none")
    modalities = {"text": ModalitySpec("tokens", (tok.max_length,)), "visual": ModalitySpec("image", (3, size, size))}
    return DataSplits(datasets["train"], datasets["val"], datasets["test"], modalities, len(classes), list(classes),
                      val_source=carved_val_source(labels[train_all], held, val_fraction, split_seed), notes=notes)


def _image_size(value, who: str) -> int:
    if int(value) < 8:
        raise DataError(f"{who}: image_size must be >= 8, got {value}")
    return int(value)


def _tokenise(tok: Tokenizer, titles: list[str], clean: bool) -> np.ndarray:
    """The titles' ids, cleaned first as BalanceBenchmark does unless `clean` is off."""
    return tok([clean_title(t) for t in titles] if clean else titles)


def _records_from_prepared(folder: PreparedFolder) -> tuple[list[Record], list[str], dict]:
    manifest = folder.path / MANIFEST
    rows, classes, meta = folder.rows(COLUMNS), folder.classes(), folder.json(PREPARED_META, optional=True)
    records = []
    for n, r in enumerate(rows, start=2):
        try:
            rec = Record(r["id"], r["split"], int(r["label"]), r["image"], r["text"], int(r["cache_row"]))
        except (ValueError, TypeError) as exc:
            raise DataError(f"food101: {manifest} line {n}: expected {','.join(COLUMNS)} ({exc}); re-run "
                            "`mmbalance prepare food101 --force`") from None
        if not 0 <= rec.label < len(classes) or rec.split not in SPLITS:
            raise DataError(f"food101: {manifest} line {n}: label {rec.label} / split {rec.split!r} out of range")
        records.append(rec)
    if not folder.has(PREPARED_META):
        log.warning("food101: %s is missing; the image cache is not used", folder.path / PREPARED_META)
    return records, classes, meta


def _tokens_meta(tok: Tokenizer, clean_text: bool, manifest: Path, rows: int) -> dict:
    """What the stored ids were made from: they are valid for this tokenizer, cleaning and manifest only."""
    return {"tokenizer": tok.name, "fingerprint": tok.fingerprint, "max_length": tok.max_length,
            "clean_text": clean_text, "manifest_sha1": hashlib.sha1(manifest.read_bytes()).hexdigest(), "rows": rows}


def _prepared_tokens(folder: PreparedFolder, tok: Tokenizer, clean_text: bool, n: int) -> np.ndarray | None:
    """The pre-tokenised ids when they were made from this manifest with this tokenizer and cleaning."""
    if not folder.has(TOKENS_META, TOKENS):
        return None
    meta, want = folder.json(TOKENS_META), _tokens_meta(tok, clean_text, folder.path / MANIFEST, n)
    if any(meta.get(k) != want[k] for k in ("fingerprint", "clean_text", "manifest_sha1")):
        log.info("food101: %s was made with another tokenizer/max_length/cleaning or manifest; tokenising now",
                 folder.path / TOKENS)
        return None
    ids = folder.array(TOKENS)
    return np.asarray(ids, dtype=np.int64) if ids.shape == (n, tok.max_length) else None


# --------------------------------------------------------------------------------------------------- prepare


def prepare(ctx: PrepareContext, image_size: ImageSize | None = None, tokenizer: str | None = None,
            max_length: MaxLength = 40, clean_text: bool = True, check_images: bool = True,
            block: PositiveInt = 4096) -> dict:
    """Validate the Food-101 tree and write the prepared folder (its files and options:
    docs/datasets.md, "mmbalance prepare food101"). A finished stage is skipped unless --force."""
    size = _image_size(image_size, "food101 prepare") if image_size else None
    found = scan(ctx.root)
    for path in found.missing:
        ctx.problem(path, "named in the titles csv but not on disk (csv row without an image)")
    # the key of the image list and of each image's size and mtime (what `make` trusts too; one stat per image,
    # no read): a cache made for another list, or before an image was replaced under the same name, is not reused
    stamps = (os.stat(ctx.root / r.image) for r in found.records)
    candidates_sha1 = hashlib.sha1("\n".join(f"{r.id}\t{st.st_size}\t{st.st_mtime_ns}" for r, st in
                                             zip(found.records, stamps)).encode()).hexdigest()
    checked = bool(check_images or size)
    bad, cache_file = {}, None
    if checked:
        paths = [str(ctx.root / r.image) for r in found.records]
        bad, cache_file = decode_images(ctx, paths, candidates_sha1, size, max(1, int(block)))
        for row, why in sorted(bad.items()):
            ctx.problem(paths[row], why)
    rows = [{**asdict(r), "class": found.classes[r.label], "cache_row": i} for i, r in enumerate(found.records)
            if i not in bad]
    ctx.folder.write_manifest(rows, COLUMNS)
    ctx.folder.write_classes(found.classes)
    unreadable = len(bad) if checked else "not checked"
    ctx.folder.write_json(PREPARED_META, {"layout": found.layout, "orphan_rows": found.orphan_rows,
                                          "orphan_images": found.orphan_images, "unreadable": unreadable,
                                          "candidates_sha1": candidates_sha1, "base": str(found.base)})
    if tokenizer:
        tok = Tokenizer(tokenizer, max_length=int(max_length))
        meta = _tokens_meta(tok, bool(clean_text), ctx.out / MANIFEST, len(rows))
        if ctx.force or not ctx.folder.has(TOKENS) or ctx.folder.json(TOKENS_META, optional=True) != meta:
            ctx.folder.write_array(TOKENS, _tokenise(tok, [r["text"] for r in rows], clean_text))
            ctx.folder.write_json(TOKENS_META, meta)
    return {"layout": found.layout, "clips": len(rows), **{s: sum(r["split"] == s for r in rows) for s in SPLITS},
            "classes": len(found.classes), "orphan_rows": found.orphan_rows, "orphan_images": found.orphan_images,
            "unknown_label_rows": found.unknown_label_rows, "duplicate_rows": found.duplicate_rows,
            "unreadable": unreadable, "image_cache": cache_file,
            "tokens": str(ctx.out / TOKENS) if tokenizer else None}
