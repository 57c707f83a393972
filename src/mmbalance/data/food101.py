"""UPMC Food-101 (Wang et al. 2015): 101 food classes, a photo plus the title of the recipe page it came from.

Raw tree, as unzipped from Kaggle ``gianmarco96/upmcfood101`` (datasets.md §1.6, §2)::

    <root>/images/{train,test}/<class>/<class>_<n>.jpg
    <root>/texts/{train,test}_titles.csv        rows: image_name,text,label

The Kaggle csvs have **no header**; BalanceBenchmark's loader expects one (``Image_path,text,label`` or
similar: it reads the columns by name), so its users added it. Both are accepted: the header is detected
per file and the columns are then taken by name. The tree may also sit one folder down (``<root>/<dir>/images``).

Modalities, in the peer's order (FOOD-101: text, visual):

* ``text``: kind ``tokens`` (max_length,) int64 -- the title, cleaned as BalanceBenchmark does (leading
  "RT", URLs and '#' dropped) and tokenised with a BERT WordPiece tokenizer, padding='max_length',
  max_length 40 (``mmbalance.data.text.Tokenizer``);
* ``visual``: kind ``image`` (3, S, S) -- BalanceBenchmark's recipe: training RandomRotation(30),
  Resize((S, S)), horizontal flip; evaluation Resize((S, S)); ImageNet normalisation; S = ``image_size``
  (224). The peer stores it as frames with T = 1, i.e. (3, 1, S, S); a photo has no time axis, and the
  ``image`` kind makes a kind-based backbone pick its image encoder (ResNet18Encoder/ViTEncoder treat
  frames with T = 1 identically), so ``image`` it is.

Classes are the sorted class folder names of ``images/train`` (persisted in classes.json by ``prepare``);
labels come from the csv rows. Splits: the official train/test; validation is carved from train (10 %,
stratified, seeded), per the settled choices (docs/architecture.md).

``mmbalance prepare food101 --root RAW`` validates the tree (header detection, csv rows without an image,
images without a row, unreadable images), writes manifest.csv + classes.json, and optionally pre-tokenises
the titles (``--set tokenizer=bert-base-uncased``) and caches the images resized to S x S as one uint8
memory-mapped array (``--set image_size=224``), so training reads no jpeg at all.
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
from mmbalance.data.prepare import MANIFEST, PrepareContext, PreparedFolder, resolve_prepared
from mmbalance.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
EXPECTED = ("<root>/images/{train,test}/<class>/<image>.jpg and <root>/texts/{train,test}_titles.csv "
            "(rows image_name,text,label; header optional)")
PREPARED_META = "food101_prepared.json"
TOKENS = "tokens.npy"
TOKENS_META = "tokens.json"

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
    """What was found under the root: which layout, the usable pairs, and what did not fit."""

    root: Path
    base: Path  # the folder holding images/ and texts/ (root, or one level down)
    layout: str
    headers: dict[str, bool]
    classes: list[str]
    records: list[Record]
    orphan_rows: dict[str, int] = field(default_factory=dict)  # csv rows without an image, per split
    orphan_images: dict[str, int] = field(default_factory=dict)  # images without a csv row, per split
    unknown_label_rows: dict[str, int] = field(default_factory=dict)
    duplicate_rows: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # the image paths csv rows name but the disk lacks

    def counts(self) -> dict:
        return {s: sum(r.split == s for r in self.records) for s in SPLITS}


def _find_base(root: Path) -> Path:
    if not root.is_dir():
        raise DataError(f"food101: dataset root {str(root)!r} is not a folder; expected {EXPECTED}")

    def ok(p: Path) -> bool:
        return (p / "images").is_dir() and (p / "texts").is_dir()

    if ok(root):
        return root
    nested = [p for p in sorted(root.iterdir()) if p.is_dir() and ok(p)]
    if len(nested) == 1:  # the archive unzipped into its own folder
        return nested[0]
    missing = [str(root / d) for d in ("images", "texts") if not (root / d).is_dir()]
    raise DataError(f"food101: {', '.join(missing)} not found under {str(root)!r}; expected {EXPECTED}")


def _pick(header: list[str], names: tuple[str, ...]) -> int | None:
    low = [h.strip().lower().lstrip("\ufeff") for h in header]
    for name in names:
        if name in low:
            return low.index(name)
    return None


def read_titles(path: Path) -> tuple[list[tuple[str, str, str]], bool]:
    """The rows (image_name, text, label) of one titles csv and whether it had a header.

    A header is recognised by its column names (one of them an image-path name such as Image_path, and
    a label name); the columns are then taken by name in whatever order they come. Without a header the
    Kaggle order image_name,text,label applies; a title containing unquoted commas is re-joined (the
    first field is the image, the last the label).
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
    i_img, i_txt, i_lab = _pick(first, _IMAGE_COLS), _pick(first, _TEXT_COLS), _pick(first, _LABEL_COLS)
    looks_like_image = first[0].strip().lower().endswith(media.IMAGE_SUFFIXES)
    has_header = not looks_like_image and i_img is not None and i_lab is not None
    if has_header:
        if i_txt is None:
            raise DataError(f"food101: {str(path)!r} has a header {first} without a text/title column")
        body = rows[1:]
        out = []
        for n, r in enumerate(body, start=2):
            if len(r) <= max(i_img, i_txt, i_lab):
                raise DataError(f"food101: {str(path)!r} line {n} has {len(r)} fields; the header has {len(first)}")
            out.append((r[i_img].strip(), r[i_txt], r[i_lab].strip()))
        return out, True
    out = []
    for n, r in enumerate(rows, start=1):
        if len(r) < 3:
            raise DataError(f"food101: {str(path)!r} line {n} has {len(r)} field(s); expected image_name,text,label")
        out.append((r[0].strip(), ",".join(r[1:-1]), r[-1].strip()))
    return out, False


def scan(root: str | Path) -> Scan:
    """Detect the layout under `root` and match csv rows to image files (no image is decoded here)."""
    root = Path(root).expanduser()
    base = _find_base(root)
    for split in SPLITS:
        if not (base / "images" / split).is_dir():
            raise DataError(f"food101: image folder {str(base / 'images' / split)!r} is missing; expected {EXPECTED}")
    classes = sorted(d.name for d in os.scandir(base / "images" / "train") if d.is_dir())
    if not classes:
        raise DataError(f"food101: {str(base / 'images' / 'train')!r} has no class folders; expected {EXPECTED}")
    stray = sorted(d.name for d in os.scandir(base / "images" / "test") if d.is_dir() and d.name not in classes)
    if stray:
        raise DataError(f"food101: {str(base / 'images' / 'test')!r} has class folders absent from images/train: "
                        f"{stray[:5]}; the class map comes from images/train")
    index = {c: i for i, c in enumerate(classes)}
    records, headers = [], {}
    result = Scan(root, base, "", headers, classes, records)
    for split in SPLITS:
        rows, headers[split] = read_titles(base / "texts" / f"{split}_titles.csv")
        on_disk: dict[str, set[str]] = {}
        for c in classes:
            folder = base / "images" / split / c
            on_disk[c] = ({e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(
                media.IMAGE_SUFFIXES)} if folder.is_dir() else set())
        used: set[tuple[str, str]] = set()
        orphan = unknown = dup = 0
        found = []
        for image, text, label in rows:
            name = os.path.basename(image.replace("\\", "/"))
            if label not in index:
                unknown += 1
                continue
            if name not in on_disk[label]:
                orphan += 1
                result.missing.append(str(base / "images" / split / label / name))
                continue
            if (label, name) in used:
                dup += 1
                continue
            used.add((label, name))
            found.append(Record(f"{split}/{label}/{name}", split, index[label],
                                f"{os.path.relpath(base, root)}/images/{split}/{label}/{name}".removeprefix("./"),
                                text))
        found.sort(key=lambda r: (r.label, media.natural_key(r.id)))  # deterministic, independent of csv order
        records.extend(found)
        result.orphan_rows[split] = orphan
        result.orphan_images[split] = sum(len(v) for v in on_disk.values()) - len(used)
        result.unknown_label_rows[split] = unknown
        result.duplicate_rows[split] = dup
        if not found:
            raise DataError(f"food101: no {split} pair found: none of the {len(rows)} rows of "
                            f"{str(base / 'texts' / f'{split}_titles.csv')!r} names an image that exists under "
                            f"{str(base / 'images' / split)!r} in its class folder")
    kinds = {s: "header" if h else "headerless" for s, h in headers.items()}
    if len(set(kinds.values())) == 1:
        layout = ("balancebenchmark (csv with header)" if headers["train"] else "kaggle (headerless csv)")
    else:
        layout = "mixed (" + ", ".join(f"{s}: {k}" for s, k in kinds.items()) + ")"
    if base != root:
        layout += f", nested in {base.name}/"
    result.layout = layout
    return result


# --------------------------------------------------------------------------------------------------- dataset


class Food101Dataset(Dataset):
    """One split: item i = {"inputs": {"text": (L,) int64, "visual": (3, S, S) float}, "label", "index"}.

    Images come from the prepared uint8 cache (``cache``: a (rows, S, S, 3) memmap file and this split's
    rows in it) when there is one, else they are decoded from ``paths``; either way
    ``media.ClipTransform(augment='rotate_flip')`` applies the recipe (the cache holds exactly the
    evaluation Resize((S, S)), so evaluation inputs are identical on both paths).
    """

    def __init__(self, paths: list[str], tokens: np.ndarray, labels: np.ndarray, image_size: int, train: bool,
                 cache: tuple[str, int, np.ndarray] | None = None):
        self.paths = list(paths)
        self.tokens = torch.as_tensor(np.ascontiguousarray(tokens), dtype=torch.long)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.size = int(image_size)
        self.train = bool(train)
        self.transform = media.ClipTransform(size=self.size, train=self.train, augment="rotate_flip")
        self.cache = cache  # (file, total rows, rows of this split)
        self._mm = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):  # a memmap is reopened in each worker, not pickled
        return {**self.__dict__, "_mm": None}

    def image(self, i: int) -> torch.Tensor:
        """The (3, H, W) uint8 image of item i (H = W = S when it comes from the cache)."""
        if self.cache is not None:
            if self._mm is None:
                file, n, _ = self.cache
                self._mm = np.memmap(file, dtype=np.uint8, mode="r", shape=(n, self.size, self.size, 3))
            return torch.from_numpy(np.array(self._mm[self.cache[2][i]])).permute(2, 0, 1)
        from torchvision.transforms.v2.functional import pil_to_tensor

        try:
            return pil_to_tensor(media.read_image(self.paths[i]))
        except DataError as exc:
            raise DataError(f"food101: {exc}; run `mmbalance prepare food101` to list and skip bad images") from None

    def __getitem__(self, i: int) -> dict:
        visual = self.transform([self.image(i)])[0]
        return {"inputs": {"text": self.tokens[i], "visual": visual}, "label": int(self.labels[i]), "index": i}


# --------------------------------------------------------------------------------------------------- builder


def build_food101(
    root: str,
    prepared: str | None = None,
    image_size: int = 224,
    tokenizer: str = "bert-base-uncased",
    max_length: int = 40,
    clean_text: bool = True,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    use_cache: bool = True,
) -> DataSplits:
    """UPMC Food-101 as DataSplits (text tokens + visual image), BalanceBenchmark's FOOD-101 recipe.

    ``root``: the raw tree (see the module docstring). ``prepared``: the folder `mmbalance prepare food101`
    wrote; None uses ``<root>/mmbalance_prepared`` when it holds a manifest, else the raw tree. From a
    prepared folder, the pre-tokenised ids are used when they were made with the same tokenizer, max_length
    and cleaning (else the titles are tokenised now), and the image cache when ``use_cache`` and it was made
    at ``image_size``. ``tokenizer``: a hub name in the local Hugging Face cache, a tokenizer folder or a
    vocab.txt (must match the text encoder's model). Validation: ``val_fraction`` of train, stratified,
    seeded with ``split_seed``.
    """
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
        meta = {}

    from mmbalance.data.text import Tokenizer, clean_text as clean

    tok = Tokenizer(tokenizer, max_length=max_length)
    tokens, tokens_source = None, "tokenised at load"
    if prep is not None:
        tokens = _prepared_tokens(prep, tok, bool(clean_text), len(records))
        tokens_source = f"{prep / TOKENS}" if tokens is not None else tokens_source
    if tokens is None:
        tokens = tok([clean(r.text) if clean_text else r.text for r in records])

    # no finite-input check (data/finite.py) here: uint8 images and int64 token ids cannot hold NaN or Inf
    cache = _prepared_cache(prep, meta, size) if (prep is not None and use_cache) else None
    cache_rows = np.array([r.cache_row for r in records], dtype=np.int64)
    labels = np.array([r.label for r in records], dtype=np.int64)
    split = np.array([r.split for r in records])
    paths = [str(root_path / r.image) for r in records]
    if cache is None and not root_path.is_dir():
        raise DataError(f"food101: dataset root {str(root_path)!r} is not a folder (the images are read from it)")

    train_all = np.flatnonzero(split == "train")
    keep, held = stratified_split(labels[train_all], val_fraction, split_seed)
    index = {"train": train_all[keep], "val": train_all[held], "test": np.flatnonzero(split == "test")}

    def subset(name: str) -> Food101Dataset:
        idx = index[name]
        c = (cache[0], cache[1], cache_rows[idx]) if cache else None
        return Food101Dataset([paths[i] for i in idx], tokens[idx], labels[idx], size, name == "train", c)

    notes = {"layout": layout, "source": source, "root": str(root_path), "tokens": tokens_source,
             "tokenizer": tok.name, "max_length": tok.max_length, "clean_text": bool(clean_text),
             "image_size": size, "image_cache": cache[0] if cache else None,
             **{k: v for k, v in extra.items() if v is not None},
             "pairs": {s: int(len(v)) for s, v in index.items()}}
    log.info("food101: %s (%s); %d classes; pairs %s; csv rows without image %s, images without row %s; "
             "tokens %s; image cache %s", layout, source, len(classes), notes["pairs"], extra.get("orphan_rows"),
             extra.get("orphan_images"), tokens_source, notes["image_cache"] or "none")
    return DataSplits(
        subset("train"), subset("val"), subset("test"),
        {"text": ModalitySpec("tokens", (tok.max_length,)), "visual": ModalitySpec("image", (3, size, size))},
        len(classes), list(classes),
        val_source=f"carved from train (stratified, {val_fraction:.0%}, seed {split_seed})", notes=notes,
    )


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
            label = int(r["label"])
            rec = Record(r["id"], r["split"], label, r["image"], r["text"], int(r["cache_row"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"food101: {prep / MANIFEST} line {n}: expected id,label,split,class,image,text,"
                            f"cache_row ({exc}); re-run `mmbalance prepare food101 --force`") from None
        if not 0 <= label < len(classes) or rec.split not in SPLITS:
            raise DataError(f"food101: {prep / MANIFEST} line {n}: label {label} / split {rec.split!r} out of range")
        records.append(rec)
    if not (prep / PREPARED_META).is_file():
        log.warning("food101: %s is missing; the image cache is not used", prep / PREPARED_META)
    return records, classes, meta


def _prepared_tokens(prep: Path, tok, clean_text: bool, n: int) -> np.ndarray | None:
    """The pre-tokenised ids when they were made from this manifest with this tokenizer and cleaning."""
    meta_path, path = prep / TOKENS_META, prep / TOKENS
    if not (meta_path.is_file() and path.is_file()):
        return None
    meta = PreparedFolder(prep, "food101").json(TOKENS_META)
    same = (meta.get("fingerprint") == tok.fingerprint and meta.get("clean_text") == clean_text
            and meta.get("manifest_sha1") == _sha1_file(prep / MANIFEST))
    if not same:
        log.info("food101: %s was made with another tokenizer/max_length/cleaning or manifest; tokenising now", path)
        return None
    ids = PreparedFolder(prep, "food101").array(TOKENS)
    if ids.shape != (n, tok.max_length):
        return None
    return np.asarray(ids, dtype=np.int64)


def _cache_name(size: int) -> str:
    return f"images_{size}.u8"


def _prepared_cache(prep: Path, meta: dict, size: int) -> tuple[str, int] | None:
    """(file, rows) of a complete image cache at this size made with this manifest's candidates, or None."""
    info_path = prep / (_cache_name(size) + ".json")
    file = prep / _cache_name(size)
    if not (info_path.is_file() and file.is_file()):
        return None
    info = PreparedFolder(prep, "food101").json(info_path.name)
    if not info.get("complete") or info.get("candidates_sha1") != meta.get("candidates_sha1"):
        log.info("food101: %s is incomplete or from another scan; decoding jpegs instead", file)
        return None
    n = int(info["rows"])
    if file.stat().st_size != n * size * size * 3:
        log.warning("food101: %s has the wrong size for %d rows of %dx%d; decoding jpegs instead", file, n, size, size)
        return None
    return str(file), n


# --------------------------------------------------------------------------------------------------- prepare


def _decode_block(task: tuple) -> list[tuple[int, str | None]]:
    """Decode (and, with a cache, resize and store) a block of images; return (row, error or None)."""
    items, cache_file, rows, size = task
    mm = None
    if cache_file is not None:
        mm = np.memmap(cache_file, dtype=np.uint8, mode="r+", shape=(rows, size, size, 3))
    out = []
    from torchvision.transforms.v2.functional import pil_to_tensor, resize

    for row, path in items:
        try:
            img = media.read_image(path)
        except DataError as exc:
            out.append((row, str(exc)))
            continue
        if mm is not None:
            # the evaluation Resize((S, S)) of ClipTransform, so cached and decoded eval inputs are identical
            x = resize(pil_to_tensor(img), [size, size], antialias=True)
            mm[row] = x.permute(1, 2, 0).numpy()
        out.append((row, None))
    if mm is not None:
        mm.flush()
    return out


def _check_images(ctx: PrepareContext, paths: list[str], candidates_sha1: str, size: int | None,
                  block: int) -> tuple[dict[int, str], str | None]:
    """Decode every image once (in blocks, resumable); with `size`, also fill the uint8 cache.

    Progress is saved after each block in <stage>.json, so an interrupted run goes on where it stopped.
    Returns ({row: why unreadable}, cache file or None).
    """
    # imported here once: worker processes forked by ctx.map inherit it instead of importing it per block
    import torchvision.transforms.v2.functional  # noqa: F401

    n = len(paths)
    stage = _cache_name(size) if size else "image_check"
    info_name = stage + ".json"
    cache_file = str(ctx.out / stage) if size else None
    info = {} if ctx.force else ctx.folder.json(info_name, optional=True)
    if info.get("candidates_sha1") != candidates_sha1 or (cache_file and not Path(cache_file).is_file()):
        info = {}
    if not info:
        info = {"candidates_sha1": candidates_sha1, "rows": n, "size": size, "done": 0, "bad": {},
                "complete": False}
        if cache_file:
            np.memmap(cache_file, dtype=np.uint8, mode="w+", shape=(n, size, size, 3)).flush()
    chunk = max(1, min(256, block // max(1, ctx.workers * 2)))
    while info["done"] < n:
        start, stop = info["done"], min(n, info["done"] + block)
        tasks = [([(r, paths[r]) for r in range(a, min(stop, a + chunk))], cache_file, n, size or 0)
                 for a in range(start, stop, chunk)]
        for results in ctx.map(_decode_block, tasks, desc=f"images {start}-{stop} of {n}"):
            for row, err in results:
                if err is not None:
                    info["bad"][str(row)] = err
        info["done"] = stop
        ctx.folder.write_json(info_name, info)
    if not info["complete"]:
        info["complete"] = True
        ctx.folder.write_json(info_name, info)
    return {int(k): v for k, v in info["bad"].items()}, cache_file


def prepare(ctx: PrepareContext, image_size: int | None = None, tokenizer: str | None = None,
            max_length: int = 40, clean_text: bool = True, check_images: bool = True, block: int = 4096) -> dict:
    """Validate the Food-101 tree and write the prepared folder.

    Always: layout detection (csv header or not), orphan counts (csv rows without an image, images without
    a row, rows with an unknown class), manifest.csv (id, label, split, class, image, text, cache_row) and
    classes.json. ``check_images`` (default on): decode every image, list unreadable ones in
    prepare_report.txt and leave them out of the manifest. ``image_size=S``: also store every image
    resized to S x S in ``images_S.u8`` (uint8 memmap, rows x S x S x 3; 224 px: ~13.6 GB for 90k pairs).
    ``tokenizer=NAME|PATH``: also pre-tokenise the titles into tokens.npy (max_length, clean_text as the
    loader's). Idempotent and resumable: a finished stage is skipped unless --force.
    """
    found = scan(ctx.root)
    candidates_sha1 = hashlib.sha1("\n".join(r.id for r in found.records).encode()).hexdigest()
    for path in found.missing:
        ctx.problem(path, "named in the titles csv but not on disk (csv row without an image)")
    size = int(image_size) if image_size else None
    if size is not None and size < 8:
        raise DataError(f"food101 prepare: image_size must be >= 8, got {image_size}")
    bad: dict[int, str] = {}
    cache_file = None
    if check_images or size:
        paths = [str(ctx.root / r.image) for r in found.records]
        bad, cache_file = _check_images(ctx, paths, candidates_sha1, size, max(1, int(block)))
        for row, why in sorted(bad.items()):
            ctx.problem(paths[row], why)
    rows = [{"id": r.id, "label": r.label, "split": r.split, "class": found.classes[r.label], "image": r.image,
             "text": r.text, "cache_row": i} for i, r in enumerate(found.records) if i not in bad]
    ctx.folder.write_manifest(rows, ["id", "label", "split", "class", "image", "text", "cache_row"])
    ctx.folder.write_classes(found.classes)
    summary = {
        "layout": found.layout,
        "clips": len(rows),
        "train": sum(r["split"] == "train" for r in rows),
        "test": sum(r["split"] == "test" for r in rows),
        "classes": len(found.classes),
        "orphan_rows": found.orphan_rows,
        "orphan_images": found.orphan_images,
        "unknown_label_rows": found.unknown_label_rows,
        "duplicate_rows": found.duplicate_rows,
        "unreadable": len(bad) if (check_images or size) else "not checked",
        "image_cache": cache_file,
        "tokens": None,
    }
    meta = {k: summary[k] for k in ("layout", "orphan_rows", "orphan_images", "unreadable")}
    meta.update(candidates_sha1=candidates_sha1, base=str(found.base))
    ctx.folder.write_json(PREPARED_META, meta)
    if tokenizer:
        summary["tokens"] = _write_tokens(ctx, rows, tokenizer, int(max_length), bool(clean_text))
    log.info("food101 prepare: %s; %d pairs (train %d, test %d); csv rows without image %s; images without "
             "row %s; unreadable %s", found.layout, summary["clips"], summary["train"], summary["test"],
             found.orphan_rows, found.orphan_images, summary["unreadable"])
    return summary


def _write_tokens(ctx: PrepareContext, rows: list[dict], tokenizer: str, max_length: int, clean_text: bool) -> str:
    from mmbalance.data.text import Tokenizer, clean_text as clean

    tok = Tokenizer(tokenizer, max_length=max_length)
    manifest_sha1 = _sha1_file(ctx.out / MANIFEST)
    path = ctx.out / TOKENS
    meta = {"tokenizer": tok.name, "fingerprint": tok.fingerprint, "max_length": max_length,
            "clean_text": clean_text, "manifest_sha1": manifest_sha1, "rows": len(rows)}
    if not ctx.force and path.is_file() and ctx.folder.json(TOKENS_META, optional=True) == meta:
        return str(path)
    ctx.folder.write_array(TOKENS, tok([clean(r["text"]) if clean_text else r["text"] for r in rows]))
    ctx.folder.write_json(TOKENS_META, meta)
    return str(path)
