"""UCF-101 (Soomro et al. 2012): 13,320 action clips of 101 classes, RGB frames + pre-computed TV-L1 optical flow.

The raw tree (the official split files, twostreamfusion / BalanceBenchmark / mmaction2 frame trees) or the folder
``mmbalance prepare ucf101`` writes, as ``visual`` (T, 3, S, S) and ``flow`` (T, 2, S, S) with BalanceBenchmark's
recipe, one augmentation per clip for both (a flip negates u). Reference: docs/datasets.md#ucf-101-ucf101
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmbalance.constraints import Fraction, NonNegativeInt, PositiveInt
from mmbalance.data import media
from mmbalance.data.batch import DataSplits
from mmbalance.data.clips import Clip, FrameReader, clip_splits
from mmbalance.data.layout import dataset_root, option_path, prepare_clips, prepared_splits, walk_dirs
from mmbalance.data.prepare import PrepareContext, PreparedFolder, resolve_prepared
from mmbalance.errors import DataError, UserError

log = logging.getLogger("mmbalance")

MODALITIES = ("visual", "flow")
STREAMS = {"visual": ("visual",), "flow": ("flow_u", "flow_v")}  # a clip's source keys per modality
_NAME = re.compile(r"^v_(.+)_g\d+_c\d+$", re.IGNORECASE)

# the layout table: frame-tree kind -> (modality, {source key: frame file-name prefix}); mmaction2 keeps RGB and
# flow in one folder per video, told apart by prefix
KINDS = {"twostreamfusion jpegs_256": ("visual", {"visual": ""}),
         "BalanceBenchmark frame folders": ("visual", {"visual": ""}),
         "frame folders": ("visual", {"visual": ""}),
         "mmaction rawframes": ("visual", {"visual": "img_"}),
         "twostreamfusion tvl1_flow u/v": ("flow", {"flow_u": "", "flow_v": ""}),
         "mmaction rawframes flow_x/flow_y": ("flow", {"flow_u": "flow_x_", "flow_v": "flow_y_"})}
# modality -> (what, option, the layouts expected)
WANTED = {"visual": ("RGB frame", "rgb_dir", "jpegs_256/v_<Class>_gNN_cNN/frame000001.jpg, <visual>/v_.../"
                     "frame_00001.jpg or rawframes/<Class>/v_.../img_00001.jpg"),
          "flow": ("optical flow", "flow_dir", "tvl1_flow/{u,v}/v_<Class>_gNN_cNN/frame000001.jpg or rawframes/"
                   "<Class>/v_.../flow_x_00001.jpg (pre-computed TV-L1 flow: mmbalance does not compute it)")}


# ---------------------------------------------------------------------------------------------------------------
# split files


def read_class_ind(path: Path) -> list[str]:
    """Class names in classInd.txt order (`<1-based index> <name>` per line)."""
    try:
        pairs = sorted((int(i), name) for i, name in media.read_split_file(path))
    except ValueError:
        raise DataError(f"{path}: expected lines '<index> <ClassName>' (e.g. '1 ApplyEyeMakeup')") from None
    if [i for i, _ in pairs] != list(range(1, len(pairs) + 1)):
        raise DataError(f"{path}: class indices must be 1..{len(pairs)} without gaps")
    return [name for _, name in pairs]


def read_split_list(path: Path, classes: list[str]) -> list[tuple[str, int]]:
    """[(video name without .avi, class index)] from a trainlist/testlist file. The class comes from the folder of
    the path (testlists have no label); a trainlist label that disagrees with it is an error."""
    index = {c.lower(): i for i, c in enumerate(classes)}
    out = []
    for rel, label in media.read_split_file(path):
        parts = rel.replace("\\", "/").split("/")
        name = parts[-1].rsplit(".", 1)[0] if parts[-1].lower().endswith((".avi", ".mp4")) else parts[-1]
        folder = parts[-2] if len(parts) > 1 else (m.group(1) if (m := _NAME.match(name)) else "")
        if folder.lower() not in index:
            raise DataError(f"{path}: {rel!r} is in class folder {folder!r}, which classInd.txt does not list")
        y = index[folder.lower()]
        if label and label.isdigit() and int(label) - 1 != y:
            raise DataError(f"{path}: {rel!r} has label {label} but its class folder {folder!r} is index {y + 1} "
                            "in classInd.txt")
        out.append((name, y))
    return out


def split_lists(split_dir: Path, split: int) -> dict[str, Path]:
    return {part: split_dir / f"{part}list0{split}.txt" for part in ("train", "test")}


def read_splits(split_dir: Path, split: int) -> tuple[list[str], list[tuple[str, int, str]]]:
    """(classes, [(video, label, 'train'|'test')]) of official split `split`."""
    if split not in (1, 2, 3):
        raise UserError(f"dataset.split={split}; UCF-101 has official splits 1, 2 and 3")
    classes = read_class_ind(split_dir / "classInd.txt")
    lists = split_lists(split_dir, split)
    for path in lists.values():
        if not path.is_file():
            raise DataError(f"UCF-101 split file {str(path)!r} does not exist (split {split}; expected "
                            "ucfTrainTestlist/{trainlist,testlist}0N.txt)")
    videos, listed_in = [], {}
    for part, path in lists.items():
        for name, y in read_split_list(path, classes):
            # a video in both lists would be trained and tested on; one listed twice would count twice
            if name.lower() in listed_in:
                raise DataError(f"UCF-101 video {name!r} is listed twice, in {listed_in[name.lower()]} and {path} "
                                f"(split {split}): a video belongs to one list, once; fix the split files")
            listed_in[name.lower()] = path
            videos.append((name, y, part))
    return classes, videos


# ---------------------------------------------------------------------------------------------------------------
# layout detection


def _scan(root: Path, exclude: tuple[Path, ...] = ()) -> list:
    """Every folder under root, four levels deep, and its entries; video folders (`v_*`) are never descended:
    there are 13k of them."""
    return walk_dirs(root, 4, exclude, descend=lambda name: not name.lower().startswith("v_"))


def find_split_dir(root: Path, splits_dir: str | None, scanned: list) -> Path:
    """The folder with classInd.txt: `splits_dir`, else found under root (ucfTrainTestlist/ as unzipped)."""
    if splits_dir:
        return option_path(root, Path(str(splits_dir)) / "classInd.txt", "splits_dir", "file").parent
    found = [folder for folder, entries in scanned if any(e.name == "classInd.txt" for e in entries)]
    if not found:
        raise DataError(f"{root}: no UCF-101 split files found (ucfTrainTestlist/classInd.txt, trainlist0N.txt, "
                        "testlist0N.txt from UCF101TrainTestSplits-RecognitionTask.zip); unzip them into the root "
                        "or set dataset.splits_dir")
    return min(found, key=lambda p: (p.name != "ucfTrainTestlist", len(p.parts)))


@dataclass
class Source:
    """One frame tree: its kind (a KINDS key), its folder, and {lower-case video name: folder} per source key."""

    kind: str
    root: Path
    index: dict[str, dict[str, Path]]

    def hits(self, names: set[str]) -> int:
        return min(len(names.intersection(ix)) for ix in self.index.values())


def _sources(scanned: list, names: set[str]) -> list[Source]:
    """The frame trees among the scanned folders: a folder whose sub-folders are video folders of the split lists
    holds frames, of a kind told from its name (u/v) and from one video folder's files. mmaction2's per-class
    folders are merged under their rawframes root, tvl1_flow's u/ and v/ under their parent."""
    trees: dict[tuple[str, Path], dict[str, dict[str, Path]]] = {}  # (kind, tree) -> {source key: {video: folder}}

    def add(kind: str, tree: Path, videos: dict[str, Path], keys=None) -> None:
        for key in keys or KINDS[kind][1]:
            trees.setdefault((kind, tree), {}).setdefault(key, {}).update(videos)

    for folder, entries in scanned:
        videos = {e.name.lower(): folder / e.name for e in entries if e.is_dir() and e.name.lower().startswith("v_")}
        if not names.intersection(videos):
            continue
        try:
            files = [e.name for e in os.scandir(videos[min(names.intersection(videos))]) if e.is_file()]
        except OSError:
            files = []
        lower = [f.lower() for f in files]
        if any(f.startswith("flow_x") for f in lower):
            add("mmaction rawframes flow_x/flow_y", folder.parent, videos)
        if any(f.startswith("img_") for f in lower):
            add("mmaction rawframes", folder.parent, videos)
        elif folder.name.lower() in ("u", "v"):
            add("twostreamfusion tvl1_flow u/v", folder.parent, videos, ["flow_" + folder.name.lower()])
        elif not any(f.startswith("flow_") for f in lower):
            first = min(files, key=media.natural_key, default="")
            kind = ("twostreamfusion jpegs_256" if re.match(r"frame\d{6}\.", first) else
                    "BalanceBenchmark frame folders" if re.match(r"frame_\d+\.", first) else "frame folders")
            add(kind, folder, videos)
    # a u/ without its v/ (or the reverse) is no flow tree
    return [Source(kind, tree, index) for (kind, tree), index in trees.items()
            if index.keys() == KINDS[kind][1].keys()]


def _pick_tree(modality: str, root: Path, pinned: str | None, scanned: list, names: set[str]) -> Source:
    """The tree of `modality` that holds the most videos of the split (DataError naming the root when none does,
    or when two hold as many)."""
    what, option, expected = WANTED[modality]
    tree = option_path(root, pinned, option)
    trees = [s for s in _sources(scanned if tree is None else _scan(tree), names) if KINDS[s.kind][0] == modality]
    ranked = sorted(trees, key=lambda s: -s.hits(names))
    if not ranked or ranked[0].hits(names) == 0:
        where = f"dataset.{option}={pinned}" if pinned else str(root)
        raise DataError(f"{where}: no {what} folders for the {len(names)} videos of the split lists; "
                        f"expected {expected}")
    if len(ranked) > 1 and ranked[1].hits(names) == ranked[0].hits(names):
        raise DataError(f"{root}: two {what} trees cover the same videos ({ranked[0].root} and {ranked[1].root}); "
                        f"pick one with dataset.{option}=<folder>")
    return ranked[0]


@dataclass
class Found:
    """The videos of one official split under a raw root: the complete clips (sources visual, flow_u, flow_v),
    the videos left out [(video, why)], and where the split files and the frame trees are."""

    classes: list[str]
    clips: list[Clip]
    missing: list[tuple[str, str]]
    split_dir: Path
    sources: dict[str, Source]  # modality -> its frame tree

    @property
    def prefixes(self) -> dict[str, str]:
        return {k: v for s in self.sources.values() for k, v in KINDS[s.kind][1].items()}

    def notes(self) -> dict:
        """The layout, as a raw build's notes and prepare's summary report it."""
        notes = {"layout": ", ".join(f"{m}: {s.kind}" for m, s in self.sources.items()),
                 "splits_dir": str(self.split_dir)}
        for m, s in self.sources.items():
            notes.update({f"{m}_layout": s.kind, f"{m}_dir": str(s.root)})
        return notes


def find_clips(root: str | Path, split: int, modalities: tuple[str, ...], splits_dir: str | None = None,
               rgb_dir: str | None = None, flow_dir: str | None = None, exclude: tuple[Path, ...] = ()) -> Found:
    """The videos of official split `split` under `root`, found in the frame trees of `modalities`."""
    root = dataset_root(root, "UCF-101")
    scanned = _scan(root, exclude)
    split_dir = find_split_dir(root, splits_dir, scanned)
    classes, videos = read_splits(split_dir, split)
    names = {n.lower() for n, _, _ in videos}
    pinned = {"visual": rgb_dir, "flow": flow_dir}
    sources = {m: _pick_tree(m, root, pinned[m], scanned, names) for m in modalities}
    streams = {k: ix for s in sources.values() for k, ix in s.index.items()}
    clips, missing = [], []
    for name, label, part in videos:
        gone = [k for k, ix in streams.items() if name.lower() not in ix]
        if gone:
            missing.append((name, "no " + " / ".join(gone) + " frame folder"))
        else:
            clips.append(Clip(name, label, part, {k: str(ix[name.lower()]) for k, ix in streams.items()}))
    return Found(classes, clips, missing, split_dir, sources)


# ---------------------------------------------------------------------------------------------------------------
# the builder and prepare


def _modalities(modalities) -> tuple[str, ...]:
    mods = tuple(modalities or MODALITIES)
    if not mods or len(set(mods)) != len(mods) or any(m not in MODALITIES for m in mods):
        raise UserError(f"dataset.modalities={list(mods)}; expected a non-empty list of {list(MODALITIES)}")
    return mods


def ucf_readers(mods: tuple[str, ...], frames: int, flow_frames: int, size: int, augment: str = "none",
                prefixes: dict[str, str] | None = None) -> dict:
    """RGB (3 channels) and optical flow (u, v: 2), frame files picked by prefix (mmaction rawframes keep both in
    one folder); ClipDataset draws one augmentation per clip for both."""
    count = {"visual": int(frames), "flow": int(flow_frames)}
    return {m: FrameReader("jpgdir", count[m], size, augment, flow=m == "flow",
                           streams={k: (prefixes or {}).get(k, "") for k in STREAMS[m]}) for m in mods}


def build_ucf101(root: str | None = None, prepared: str | None = None, split: Literal[1, 2, 3] = 1,
                 modalities: Sequence[Literal[MODALITIES]] = MODALITIES, splits_dir: str | None = None,
                 rgb_dir: str | None = None, flow_dir: str | None = None, frames: PositiveInt = 3,
                 flow_frames: PositiveInt = 3, image_size: PositiveInt = 224,
                 augment: media.Augment = "resize_flip", val_fraction: Fraction = 0.1,
                 split_seed: NonNegativeInt = 0) -> DataSplits:
    """UCF-101 as DataSplits with modalities visual (frames, 3, S, S) and flow (flow_frames, 2, S, S), in the
    order of `modalities`, from the raw tree under `root` or the `mmbalance prepare ucf101` folder `prepared`."""
    prepared = resolve_prepared(root, prepared, "ucf101")  # "auto": ROOT/mmbalance_prepared when prepare wrote it
    mods = _modalities(modalities)
    if prepared is not None:
        folder = PreparedFolder(prepared, "ucf101").require()
        rows, column = folder.rows(), f"split{split}"
        if column not in rows[0]:
            have = [k[-1] for k in rows[0] if re.fullmatch(r"split\d", k)]
            raise DataError(f"dataset.prepared {str(folder.path)!r} has no split {split} (the split files prepared "
                            f"were {have}); set dataset.split to one of them")
        clips = [Clip(r["id"], int(r["label"]), r[column], {}) for r in rows if r[column] in ("train", "test")]
        splits = prepared_splits(folder, clips, folder.classes(), val_fraction=val_fraction, split_seed=split_seed,
                                 modalities=mods, notes={"split": split},
                                 readers=ucf_readers(mods, frames, flow_frames, image_size, augment))
    else:
        found = find_clips(root, split, mods, splits_dir, rgb_dir, flow_dir)
        if not found.clips:
            raise DataError(f"{root}: none of the videos of split {split} has all of {list(mods)}")
        if found.missing:
            log.warning("ucf101: %d videos of split %d have no %s frames and are left out (first: %s: %s)",
                        len(found.missing), split, "/".join(mods), *found.missing[0])
        log.info("ucf101: split %d, %s; %d videos, %d left out for missing frames", split,
                 ", ".join(f"{m}: {s.kind} ({s.root})" for m, s in found.sources.items()), len(found.clips),
                 len(found.missing))
        notes = {**found.notes(), "source": "raw", "missing_videos": len(found.missing),
                 "missing_examples": [n for n, _ in found.missing[:5]], "split": split}
        readers = ucf_readers(mods, frames, flow_frames, image_size, augment, found.prefixes)
        splits = clip_splits(found.clips, readers, found.classes, val_fraction=val_fraction, split_seed=split_seed,
                             notes=notes)
    splits.notes["clips"] = {k: len(getattr(splits, k)) for k in ("train", "val", "test")}
    return splits


def _count_frames(task: tuple) -> tuple[int, dict[str, int], str | None, str | None]:
    """Worker: the frame count of each stream of one video, or the first error (path, why)."""
    i, sources, prefixes = task
    counts = {}
    for k, folder in sources.items():
        try:
            counts[k] = len(media.list_frames(folder, prefixes.get(k, "")))
        except DataError as exc:
            return i, counts, folder, str(exc)
    return i, counts, None, None


def prepare(ctx: PrepareContext, split: Literal[1, 2, 3] = 1,
            modalities: Sequence[Literal[MODALITIES]] = MODALITIES, splits_dir: str | None = None,
            rgb_dir: str | None = None, flow_dir: str | None = None, size: PositiveInt = 224,
            max_frames: PositiveInt = 10, cache: bool = True) -> dict:
    """`mmbalance prepare ucf101` (layout.prepare_clips): manifest.csv adds the video's part in every official
    split found (split1..split3: one cache serves all) and n_visual/n_flow."""
    mods = _modalities(modalities)
    found = find_clips(ctx.root, split, mods, splits_dir, rgb_dir, flow_dir, exclude=(ctx.out,))
    prefixes = found.prefixes
    membership: dict[str, dict[int, str]] = {}  # video -> {split number: train|test}
    for k in (1, 2, 3):
        if all(path.is_file() for path in split_lists(found.split_dir, k).values()):
            for name, _, part in read_splits(found.split_dir, k)[1]:
                membership.setdefault(name.lower(), {})[k] = part
    splits_found = sorted({k for v in membership.values() for k in v})
    good, n_frames = [], {}
    tasks = [(i, c.sources, prefixes) for i, c in enumerate(found.clips)]
    for i, counts, path, why in ctx.map(_count_frames, tasks, desc="checking videos"):
        if why is not None:
            ctx.problem(path, why)
        else:
            good.append(found.clips[i])
            n_frames[found.clips[i].id] = counts

    def columns(c: Clip) -> dict:
        nf = n_frames[c.id]
        return {**{f"split{k}": membership.get(c.id.lower(), {}).get(k, "") for k in splits_found},
                "n_visual": nf.get("visual", ""), "n_flow": min(nf["flow_u"], nf["flow_v"]) if "flow_u" in nf else ""}

    summary = {**found.notes(), "classes": len(found.classes), "split": split, "splits_in_manifest": splits_found,
               "videos": len(good), "missing_videos": len(found.missing),
               "unreadable_videos": len(found.clips) - len(good),
               **{f"videos_{s}": sum(c.split == s for c in good) for s in ("train", "test")}}
    return prepare_clips(ctx, "ucf101", good, dict.fromkeys(prefixes, "jpgdir"), found.classes, summary=summary,
                         problems=found.missing, columns=columns, size=size, max_frames=max_frames,
                         cache_readers=(lambda kinds, clips: ucf_readers(mods, 1, 1, size, prefixes=prefixes))
                         if cache else None)
