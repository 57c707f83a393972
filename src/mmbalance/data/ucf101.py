"""UCF-101 action recognition with two modalities: RGB frames and pre-computed TV-L1 optical flow.

Reference: datasets.md §1.5, §2 "UCF-101", §5 "ucf101", §6 items 2 and 7. 13,320 clips, 101 classes; the
official split files (``UCF101TrainTestSplits-RecognitionTask.zip`` -> ``ucfTrainTestlist/``):
``classInd.txt`` (``1 ApplyEyeMakeup``, 1-based), ``trainlist0N.txt`` (``ApplyEyeMakeup/v_..._g08_c01.avi 1``)
and ``testlist0N.txt`` (no label: it is taken from the class folder of the path). Split 1 (9,537 / 3,783) is the
default; ``split`` picks 1-3. Class indices follow classInd (0-based here).

Accepted layouts (autodetected under ``root``, up to four folder levels deep; ``splits_dir``/``rgb_dir``/
``flow_dir`` pin them). Frame files are globbed and sorted naturally -- never a hard-coded frame count:

* RGB: twostreamfusion ``jpegs_256/v_<Class>_gNN_cNN/frame000001.jpg``; BalanceBenchmark
  ``<visual>/v_.../frame_00001.jpg`` (any folder of ``v_*`` frame folders); mmaction2 rawframes
  ``rawframes/<Class>/v_.../img_00001.jpg``;
* flow: twostreamfusion ``tvl1_flow/{u,v}/v_.../frame000001.jpg`` (one 8-bit grey jpg per direction); mmaction2
  rawframes ``rawframes/<Class>/v_.../flow_x_00001.jpg`` + ``flow_y_00001.jpg``.
Video folders are matched case-insensitively (the split files say ``v_HandStandPushups_...`` where some
extractions wrote ``v_HandstandPushups_...``). Flow is never computed here: TV-L1 takes GPU-days, download it.

Recipe (BalanceBenchmark ``ucf101_dataset.py``, with its flow bugs fixed -- §6 item 7): ``frames`` RGB frames
and ``flow_frames`` (u, v) pairs, each sampled segment-wise on their own; flow scaled to [-1, 1] (x / 127.5 - 1,
so zero motion is 0; the peer feeds [0, 1]); the training augmentation (``resize_flip``: Resize((S, S)) +
horizontal flip) is drawn ONCE per clip and applied to RGB and flow together, u negated on a flip (the peer flips
RGB, u and v independently and never negates u). UCF-101 has no validation split: it is carved from train.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

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
        folder = parts[-2] if len(parts) > 1 else (_NAME.match(name).group(1) if _NAME.match(name) else "")
        if folder.lower() not in index:
            raise DataError(f"{path}: {rel!r} is in class folder {folder!r}, which classInd.txt does not list")
        y = index[folder.lower()]
        if label and label.isdigit() and int(label) - 1 != y:
            raise DataError(f"{path}: {rel!r} has label {label} but its class folder {folder!r} is index {y + 1} "
                            "in classInd.txt")
        out.append((name, y))
    return out


def read_splits(split_dir: Path, split: int) -> tuple[list[str], list[tuple[str, int, str]]]:
    """(classes, [(video, label, 'train'|'test')]) of official split `split`."""
    if split not in (1, 2, 3):
        raise UserError(f"dataset.split={split}; UCF-101 has official splits 1, 2 and 3")
    classes = read_class_ind(split_dir / "classInd.txt")
    lists = {part: split_dir / f"{part}list0{split}.txt" for part in ("train", "test")}
    for path in lists.values():
        if not path.is_file():
            raise DataError(f"UCF-101 split file {str(path)!r} does not exist (split {split}; expected "
                            "ucfTrainTestlist/{trainlist,testlist}0N.txt)")
    return classes, [(n, y, part) for part, path in lists.items() for n, y in read_split_list(path, classes)]


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
    """Where one modality's frames live: {lower-case video name: folder} per stream, plus file prefixes."""

    kind: str  # e.g. 'twostreamfusion jpegs_256', 'mmaction rawframes'
    root: Path
    index: dict[str, dict[str, Path]]  # stream ('visual' | 'flow_u' | 'flow_v') -> {video: folder}
    prefix: dict[str, str]

    def hits(self, names: set[str]) -> int:
        return min(len(names.intersection(ix)) for ix in self.index.values())


def _sources(scanned: list, names: set[str]) -> dict[str, list[Source]]:
    """Candidate RGB and flow sources among the scanned folders: a folder whose sub-folders are video folders of
    the split lists is a container; its kind is told from its name (u/v) and from one video folder's files."""
    out: dict[str, list[Source]] = {"visual": [], "flow": []}
    mm_rgb: dict[Path, dict] = {}  # mmaction: per-class containers merged under their rawframes root
    mm_flow: dict[Path, dict] = {}
    uv: dict[Path, dict[str, dict]] = {}
    for folder, entries in scanned:
        videos = {e.name.lower(): folder / e.name for e in entries if e.is_dir() and e.name.lower().startswith("v_")}
        if not names.intersection(videos):
            continue
        try:
            names_ = [e.name for e in os.scandir(videos[min(names.intersection(videos))]) if e.is_file()]
        except OSError:
            names_ = []
        files = [f.lower() for f in names_]
        if any(f.startswith("flow_x") for f in files):
            mm_flow.setdefault(folder.parent, {}).update(videos)
        if any(f.startswith("img_") for f in files):
            mm_rgb.setdefault(folder.parent, {}).update(videos)
        elif folder.name.lower() in ("u", "v"):
            uv.setdefault(folder.parent, {})[folder.name.lower()] = videos
        elif not any(f.startswith("flow_") for f in files):
            first = min(names_, key=media.natural_key, default="")
            kind = ("twostreamfusion jpegs_256" if re.match(r"frame\d{6}\.", first) else
                    "BalanceBenchmark frame folders" if re.match(r"frame_\d+\.", first) else "frame folders")
            out["visual"].append(Source(kind, folder, {"visual": videos}, {"visual": ""}))
    out["visual"] += [Source("mmaction rawframes", p, {"visual": v}, {"visual": "img_"}) for p, v in mm_rgb.items()]
    out["flow"] += [Source("mmaction rawframes flow_x/flow_y", p, {"flow_u": v, "flow_v": v},
                           {"flow_u": "flow_x_", "flow_v": "flow_y_"}) for p, v in mm_flow.items()]
    out["flow"] += [Source("twostreamfusion tvl1_flow u/v", p, {"flow_u": pair["u"], "flow_v": pair["v"]},
                           {"flow_u": "", "flow_v": ""}) for p, pair in uv.items() if "u" in pair and "v" in pair]
    return out


# modality -> (what, option, the layouts expected)
WANTED = {"visual": ("RGB frame", "rgb_dir", "jpegs_256/v_<Class>_gNN_cNN/frame000001.jpg, <visual>/v_.../"
                     "frame_00001.jpg or rawframes/<Class>/v_.../img_00001.jpg"),
          "flow": ("optical flow", "flow_dir", "tvl1_flow/{u,v}/v_<Class>_gNN_cNN/frame000001.jpg or rawframes/"
                   "<Class>/v_.../flow_x_00001.jpg (pre-computed TV-L1 flow: mmbalance does not compute it)")}


@dataclass
class Layout:
    split_dir: Path
    sources: dict[str, Source]  # modality -> Source
    notes: dict = field(default_factory=dict)

    @property
    def prefixes(self) -> dict[str, str]:
        return {k: v for s in self.sources.values() for k, v in s.prefix.items()}

    @property
    def kinds(self) -> str:
        return ", ".join(f"{m}: {s.kind}" for m, s in self.sources.items())


def detect_layout(root: Path, names: set[str], modalities: tuple[str, ...], split_dir: Path, pinned: dict,
                  scanned: list) -> Layout:
    """Find the RGB and flow trees that hold the split's videos (DataError naming root when one is missing)."""
    sources = {}
    for m in modalities:
        what, option, expected = WANTED[m]
        tree = option_path(root, pinned.get(option), option)
        ranked = sorted(_sources(scanned if tree is None else _scan(tree), names)[m], key=lambda s: -s.hits(names))
        if not ranked or ranked[0].hits(names) == 0:
            where = f"dataset.{option}={pinned[option]}" if pinned.get(option) else str(root)
            raise DataError(f"{where}: no {what} folders for the {len(names)} videos of the split lists; "
                            f"expected {expected}")
        if len(ranked) > 1 and ranked[1].hits(names) == ranked[0].hits(names):
            raise DataError(f"{root}: two {what} trees cover the same videos ({ranked[0].root} and {ranked[1].root}); "
                            f"pick one with dataset.{option}=<folder>")
        sources[m] = ranked[0]
    notes = {"splits_dir": str(split_dir), **{k: v for m, s in sources.items()
                                              for k, v in ((f"{m}_layout", s.kind), (f"{m}_dir", str(s.root)))}}
    return Layout(split_dir, sources, notes)


def find_clips(root: str | Path, split: int, modalities: tuple[str, ...], splits_dir: str | None = None,
               rgb_dir: str | None = None, flow_dir: str | None = None, exclude: tuple[Path, ...] = ()
               ) -> tuple[list[Clip], list[str], Layout, list[tuple[str, str]]]:
    """(clips with sources {visual, flow_u, flow_v}, classes, layout, [(video, why)] of videos left out)."""
    root = dataset_root(root, "UCF-101")
    scanned = _scan(root, exclude)
    split_dir = find_split_dir(root, splits_dir, scanned)
    classes, videos = read_splits(split_dir, split)
    layout = detect_layout(root, {n.lower() for n, _, _ in videos}, modalities, split_dir,
                           {"rgb_dir": rgb_dir, "flow_dir": flow_dir}, scanned)
    streams = {k: ix for s in layout.sources.values() for k, ix in s.index.items()}
    clips, missing = [], []
    for name, label, part in videos:
        gone = [k for k, ix in streams.items() if name.lower() not in ix]
        if gone:
            missing.append((name, "no " + " / ".join(gone) + " frame folder"))
        else:
            clips.append(Clip(name, label, part, {k: str(ix[name.lower()]) for k, ix in streams.items()}))
    return clips, classes, layout, missing


# ---------------------------------------------------------------------------------------------------------------
# the builder


def _modalities(modalities) -> tuple[str, ...]:
    mods = tuple(modalities or MODALITIES)
    if not mods or len(set(mods)) != len(mods) or any(m not in MODALITIES for m in mods):
        raise UserError(f"dataset.modalities={list(mods)}; expected a non-empty list of {list(MODALITIES)}")
    return mods


def ucf_readers(mods: tuple[str, ...], frames: dict[str, int], size: int, augment: str = "none",
                prefixes: dict[str, str] | None = None) -> dict:
    """RGB (3 channels) and optical flow (u, v: 2), frame files picked by prefix (mmaction rawframes keep both in
    one folder); ClipDataset draws one augmentation per clip for both."""
    return {m: FrameReader("jpgdir", frames[m], size, augment, flow=m == "flow",
                           streams={k: (prefixes or {}).get(k, "") for k in STREAMS[m]}) for m in mods}


def build_ucf101(root: str | None = None, prepared: str | None = None, split: int = 1,
                 modalities: list[str] | tuple[str, ...] = MODALITIES, splits_dir: str | None = None,
                 rgb_dir: str | None = None, flow_dir: str | None = None, frames: int = 3, flow_frames: int = 3,
                 image_size: int = 224, augment: str = "resize_flip", val_fraction: float = 0.1,
                 split_seed: int = 0) -> DataSplits:
    """UCF-101 as DataSplits with modalities visual (frames (frames, 3, S, S)) and flow (frames (flow_frames, 2,
    S, S)), in the order of `modalities`; the raw tree under `root` (`splits_dir`/`rgb_dir`/`flow_dir` pin its
    layout) or the `mmbalance prepare ucf101` folder `prepared`. split: official split 1-3. augment: shared by RGB
    and flow (resize_flip = BalanceBenchmark's Resize + HFlip; crop_flip, rotate_flip, none)."""
    prepared = resolve_prepared(root, prepared)  # "auto": ROOT/mmbalance_prepared when prepare wrote it
    mods, nframes = _modalities(modalities), {"visual": int(frames), "flow": int(flow_frames)}
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
                                 readers=ucf_readers(mods, nframes, image_size, augment))
    else:
        clips, classes, layout, missing = find_clips(root, split, mods, splits_dir, rgb_dir, flow_dir)
        if not clips:
            raise DataError(f"{root}: none of the videos of split {split} has all of {list(mods)}")
        if missing:
            log.warning("ucf101: %d videos of split %d have no %s frames and are left out (first: %s: %s)",
                        len(missing), split, "/".join(mods), *missing[0])
        log.info("ucf101: split %d, %s; %d videos, %d left out for missing frames", split,
                 ", ".join(f"{m}: {s.kind} ({s.root})" for m, s in layout.sources.items()), len(clips), len(missing))
        notes = {"layout": layout.kinds, **layout.notes, "source": "raw", "missing_videos": len(missing),
                 "missing_examples": [n for n, _ in missing[:5]], "split": split}
        splits = clip_splits(clips, ucf_readers(mods, nframes, image_size, augment, layout.prefixes), classes,
                             val_fraction=val_fraction, split_seed=split_seed, notes=notes)
    splits.notes["clips"] = {k: len(getattr(splits, k)) for k in ("train", "val", "test")}
    return splits


# ---------------------------------------------------------------------------------------------------------------
# prepare


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


def prepare(ctx: PrepareContext, split: int = 1, modalities: list[str] | tuple[str, ...] = MODALITIES,
            splits_dir: str | None = None, rgb_dir: str | None = None, flow_dir: str | None = None,
            size: int = 224, max_frames: int = 10, cache: bool = True) -> dict:
    """`mmbalance prepare ucf101`: every video's RGB and flow folders must have frames (else reported and left
    out); manifest.csv has the split of every split file found (split1..3 columns, so one cache serves all) and
    n_visual/n_flow. Options: split (the `split` column), modalities, splits_dir/rgb_dir/flow_dir, size (cached
    frame side), max_frames (per video and modality), cache (false: stop after the manifest)."""
    mods = _modalities(modalities)
    clips, classes, layout, missing = find_clips(ctx.root, split, mods, splits_dir, rgb_dir, flow_dir,
                                                 exclude=(ctx.out,))
    membership: dict[str, dict[int, str]] = {}  # video -> {split number: train|test}
    for k in (1, 2, 3):
        lists = {part: layout.split_dir / f"{part}list0{k}.txt" for part in ("train", "test")}
        if all(p.is_file() for p in lists.values()):
            for part, path in lists.items():
                for name, _ in read_split_list(path, classes):
                    membership.setdefault(name.lower(), {})[k] = part
    splits_found = sorted({k for v in membership.values() for k in v})
    good, n_frames = [], {}
    for i, counts, path, why in ctx.map(_count_frames, [(i, c.sources, layout.prefixes) for i, c in enumerate(clips)],
                                        desc="checking videos"):
        if why is not None:
            ctx.problem(path, why)
        else:
            good.append(clips[i])
            n_frames[clips[i].id] = counts

    def columns(c: Clip) -> dict:
        nf = n_frames[c.id]
        return {**{f"split{k}": membership.get(c.id.lower(), {}).get(k, "") for k in splits_found},
                "n_visual": nf.get("visual", ""), "n_flow": min(nf["flow_u"], nf["flow_v"]) if "flow_u" in nf else ""}

    summary = {"layout": layout.kinds, **layout.notes, "classes": len(classes), "split": split,
               "splits_in_manifest": splits_found, "videos": len(good), "missing_videos": len(missing),
               "unreadable_videos": len(clips) - len(good),
               **{f"videos_{s}": sum(c.split == s for c in good) for s in ("train", "test")}}
    return prepare_clips(ctx, "ucf101", good, dict.fromkeys(layout.prefixes, "jpgdir"), classes, summary=summary,
                         problems=missing, columns=columns, size=size, max_frames=max_frames,
                         cache_readers=(lambda kinds, clips: ucf_readers(mods, dict.fromkeys(mods, 1), size,
                                                                         prefixes=layout.prefixes)) if cache else None)
