"""UPMC Food-101: both csv layouts, orphans, the recipe's transforms, prepare (cache + tokens), errors, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_metrics, run_cli
from fixtures_food101 import CLASSES, make_food101, minilm_dir, title
from mmbalance.data.batch import carved_val_source, stratified_split
from mmbalance.data.food101 import build_food101, read_titles, scan
from mmbalance.data.prepare import PreparedFolder, run_prepare
from mmbalance.data.text import Tokenizer, clean_text
from mmbalance.errors import DataError

S = 32


@pytest.fixture(scope="module")
def minilm():
    return minilm_dir()


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    return make_food101(tmp_path_factory.mktemp("kaggle"))


def ids_labels(ds):
    return [(Path(p).name, int(lab)) for p, lab in zip(ds.paths, ds.labels)]


def test_kaggle_headerless_layout_loads_with_the_recipe(kaggle, minilm):
    splits = build_food101(str(kaggle), image_size=S, tokenizer=minilm)
    assert splits.notes["layout"] == "kaggle (headerless csv)" and splits.notes["source"] == "raw tree"
    assert splits.class_names == list(CLASSES) and splits.num_classes == 3
    assert list(splits.modalities) == ["text", "visual"]
    assert splits.modalities["text"].kind == "tokens" and splits.modalities["text"].shape == (40,)
    assert splits.modalities["visual"].kind == "image" and splits.modalities["visual"].shape == (3, S, S)
    # official test split; validation = 10 % of each class of train (8 per class -> 1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (21, 3, 9)
    # the share actually carved: 10 % of 8 rounds to one per class, 12.5 % of train
    assert splits.val_source == "carved from train (stratified, 3 of 24 = 12.5 % (asked 10 %, rounded per class), " \
                                "seed 0)"
    assert sorted(np.bincount(splits.val.labels).tolist()) == [1, 1, 1]
    assert not set(splits.train.paths) & set(splits.val.paths)
    # labels follow the class folder of each image
    for ds in (splits.train, splits.val, splits.test):
        for path, label in zip(ds.paths, ds.labels):
            assert Path(path).parent.name == CLASSES[label]
    item = splits.test[0]
    text, visual = item["inputs"]["text"], item["inputs"]["visual"]
    assert text.dtype == torch.int64 and text.shape == (40,) and visual.dtype == torch.float32
    # the title was cleaned (no RT, URL, '#') before tokenising: BalanceBenchmark's cleaning
    name = Path(splits.test.paths[0]).stem
    cls, n = name.rsplit("_", 1)
    expect = Tokenizer(minilm, 40)([clean_text(title(cls, int(n) - 100))])[0]
    assert torch.equal(text, torch.from_numpy(expect))
    # evaluation is deterministic Resize + ImageNet normalisation; training augments (rotation/flip)
    assert torch.equal(splits.test[0]["inputs"]["visual"], visual)
    torch.manual_seed(0)
    draws = [splits.train[0]["inputs"]["visual"] for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert visual.mean().abs() < 3 and visual.min() < 0  # normalised, not [0, 1]


@pytest.mark.parametrize("counts, fraction, text", [
    ([4, 4, 4], 0.1, "3 of 12 = 25 % (asked 10 %, at least one per class)"),  # the minimum, not the fraction
    ([8, 8, 8], 0.1, "3 of 24 = 12.5 % (asked 10 %, rounded per class)"),
    ([10] * 10, 0.1, "10 of 100 = 10 %"),
    ([1, 1, 5], 0.2, "1 of 7 = 14.3 % (asked 20 %, rounded per class)"),  # a class of one keeps its clip
])
def test_a_carved_validation_split_states_the_share_it_holds(counts, fraction, text):
    labels = np.repeat(np.arange(len(counts)), counts)
    _, held = stratified_split(labels, fraction, 0)
    assert carved_val_source(labels, held, fraction, 0) == f"carved from train (stratified, {text}, seed 0)"


def test_clean_text_follows_balancebenchmark():
    assert clean_text("RT #Apple pie http://t.co/x1 by #chef") == "Apple pie by chef"
    assert clean_text("RT: grilled www.food.com/a fish ") == "grilled fish"
    assert clean_text("ARTICHOKE soup") == "ARTICHOKE soup"  # only a leading, whole-word RT


def test_header_layout_nested_gives_the_same_pairs(kaggle, tmp_path, minilm):
    root = make_food101(tmp_path / "bb", header=True, nested="UPMC_Food101")
    rows, has_header = read_titles(root / "UPMC_Food101" / "texts" / "train_titles.csv")
    assert has_header and rows[0][0].endswith(".jpg") and rows[0][2] in CLASSES
    a = build_food101(str(kaggle), image_size=S, tokenizer=minilm)
    b = build_food101(str(root), image_size=S, tokenizer=minilm)
    assert b.notes["layout"] == "balancebenchmark (csv with header), nested in UPMC_Food101/"
    for split in ("train", "val", "test"):
        da, db = getattr(a, split), getattr(b, split)
        assert ids_labels(da) == ids_labels(db)
        assert torch.equal(da.tokens, db.tokens)  # titles with commas survive both csv styles


def test_orphans_and_unknown_labels_are_counted(tmp_path, minilm):
    root = make_food101(tmp_path / "raw")
    (root / "images" / "train" / "sushi" / "sushi_3.jpg").unlink()  # a csv row without its image
    (root / "images" / "test" / "tacos" / "tacos_999.jpg").write_bytes(
        (root / "images" / "test" / "tacos" / "tacos_100.jpg").read_bytes())  # an image without a row
    with (root / "texts" / "test_titles.csv").open("a") as f:
        f.write("pizza_1.jpg,a pizza,pizza\n")  # a class that has no folder
    found = scan(root)
    assert found.orphan_rows == {"train": 1, "test": 0}
    assert found.orphan_images == {"train": 0, "test": 1}
    assert found.unknown_label_rows == {"train": 0, "test": 1}
    assert found.missing == [str(root / "images" / "train" / "sushi" / "sushi_3.jpg")]
    splits = build_food101(str(root), image_size=S, tokenizer=minilm)
    assert len(splits.train) + len(splits.val) == 23 and len(splits.test) == 9
    assert splits.notes["orphan_rows"]["train"] == 1 and splits.notes["orphan_images"]["test"] == 1


def test_prepare_cache_and_tokens_match_the_raw_path(tmp_path, minilm):
    root = make_food101(tmp_path / "raw")
    bad = root / "images" / "test" / "sushi" / "sushi_101.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "prep"
    summary = run_prepare("food101", root, out, workers=1, progress=False, image_size=S, tokenizer=minilm)
    assert summary["layout"] == "kaggle (headerless csv)"
    assert (summary["clips"], summary["train"], summary["test"], summary["unreadable"]) == (32, 24, 8, 1)
    report = (out / "prepare_report.txt").read_text()
    assert str(bad) in report and "cannot read image" in report
    assert PreparedFolder(out).classes() == list(CLASSES)
    manifest = PreparedFolder(out).rows()
    assert len(manifest) == 32 and not any(r["id"] == "test/sushi/sushi_101.jpg" for r in manifest)
    assert set(manifest[0]) >= {"id", "label", "split", "class", "image", "text", "cache_row"}
    cache = out / f"images_{S}.u8"
    assert cache.stat().st_size == 33 * S * S * 3 and (out / "tokens.npy").is_file()
    assert np.load(out / "tokens.npy").shape == (32, 40)

    prepared = build_food101(str(root), prepared=str(out), image_size=S, tokenizer=minilm)
    raw = build_food101(str(root), image_size=S, tokenizer=minilm)
    assert prepared.notes["image_cache"] == str(cache) and prepared.notes["tokens"] == str(out / "tokens.npy")
    assert prepared.notes["unreadable"] == 1
    # same pairs, labels and tokens; evaluation images identical (the cache holds the eval Resize)
    assert ids_labels(prepared.train) == ids_labels(raw.train)
    assert ids_labels(prepared.test) == [x for x in ids_labels(raw.test) if x[0] != "sushi_101.jpg"]
    keep = [i for i, p in enumerate(raw.test.paths) if not p.endswith("sushi_101.jpg")]
    for j, i in enumerate(keep):
        assert torch.equal(prepared.test[j]["inputs"]["visual"], raw.test[i]["inputs"]["visual"])
        assert torch.equal(prepared.test[j]["inputs"]["text"], raw.test[i]["inputs"]["text"])
    # the raw path meets the corrupt image only when it reads it: a DataError naming the file
    with pytest.raises(DataError, match="sushi_101.jpg"):
        raw.test[raw.test.paths.index(str(bad))]
    # a different tokenizer length does not reuse the stored ids; without the cache jpegs are decoded
    other = build_food101(str(root), prepared=str(out), image_size=S, tokenizer=minilm, max_length=16,
                          use_cache=False)
    assert other.notes["tokens"] == "tokenised at load" and other.notes["image_cache"] is None
    assert other.test[0]["inputs"]["text"].shape == (16,)
    # nor is the image cache of another size: the config's size is decoded from the raw tree
    bigger = build_food101(str(root), prepared=str(out), image_size=2 * S, tokenizer=minilm)
    assert bigger.notes["image_cache"] is None and bigger.test[0]["inputs"]["visual"].shape == (3, 2 * S, 2 * S)

    # idempotent: a second run redoes nothing (the cache file is not rewritten)
    stamp = cache.stat().st_mtime_ns
    again = run_prepare("food101", root, out, workers=1, progress=False, image_size=S, tokenizer=minilm)
    assert cache.stat().st_mtime_ns == stamp and again["clips"] == 32 and again["unreadable"] == 1


def test_prepare_resumes_an_interrupted_image_stage(tmp_path):
    root = make_food101(tmp_path / "raw", n_train=3, n_test=1)
    out = tmp_path / "prep"
    run_prepare("food101", root, out, workers=1, progress=False, image_size=S, block=5)
    info = json.loads((out / f"images_{S}.u8.json").read_text())
    assert info["complete"] and info["done"] == 12
    # pretend it stopped after the first block: only the rest is decoded again
    info.update(done=5, complete=False)
    (out / f"images_{S}.u8.json").write_text(json.dumps(info))
    cache = np.memmap(out / f"images_{S}.u8", dtype=np.uint8, mode="r+", shape=(12, S, S, 3))
    first = np.array(cache[0])
    cache[0] = 7
    cache.flush()
    run_prepare("food101", root, out, workers=1, progress=False, image_size=S, block=5)
    cache = np.memmap(out / f"images_{S}.u8", dtype=np.uint8, mode="r", shape=(12, S, S, 3))
    assert (cache[0] == 7).all() and not np.array_equal(first, cache[0])  # block 0 was not redone
    assert json.loads((out / f"images_{S}.u8.json").read_text())["complete"]


def test_bad_roots_and_files_name_the_path(tmp_path, minilm):
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        build_food101(str(tmp_path / "nowhere"), tokenizer=minilm)
    root = make_food101(tmp_path / "raw", n_train=2, n_test=1)
    (root / "texts" / "test_titles.csv").unlink()
    with pytest.raises(DataError, match="test_titles.csv"):
        scan(root)
    (root / "texts" / "test_titles.csv").write_text("apple_pie_100.jpg;no commas here\n")
    with pytest.raises(DataError, match=r"test_titles.csv.*line 1"):
        scan(root)
    (root / "texts" / "test_titles.csv").write_text("x.jpg,a title,apple_pie\n")
    with pytest.raises(DataError, match=r"no test pair found"):
        scan(root)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(DataError, match=str(empty / "texts")):
        scan(empty)
    with pytest.raises(DataError, match="prepared folder"):
        build_food101(str(root), prepared=str(tmp_path / "noprep"), tokenizer=minilm)


def test_cli_paper_food101_runs_one_epoch(tmp_path, minilm):
    make_food101(tmp_path / "data" / "food101", n_train=5, n_test=2)  # 12 train pairs: full batches of 4
    proc = run_cli(["experiment=paper_food101", f"paths.data_dir={tmp_path / 'data'}", "trainer.epochs=1",
                    "trainer.batch_size=4", "trainer.progress_bar=false", "hardware=cpu", f"dataset.image_size={S}",
                    "dataset.max_length=16",
                    "eval.flops=false",  # FLOPs with these encoders: tests/test_pretrained_backbones.py (saves ~9 s)
                    f"dataset.tokenizer={minilm}", f"backbone.encoders.tokens.model={minilm}",
                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_metrics(tmp_path / "run")
    assert results["status"] == "completed" and results["modalities"] == ["text", "visual"]
    assert results["split_sizes"] == {"train": 12, "val": 3, "test": 6}
    cfg = results["config"]
    assert cfg["optimizer"]["lr"] == pytest.approx(1e-3) and cfg["scheduler"]["step_size"] == 30
    assert cfg["backbone"]["encoders"]["tokens"]["_target_"].endswith("TextTransformerEncoder")
    assert results["dataset_notes"]["layout"] == "kaggle (headerless csv)"
    m = results["metrics"]
    assert 0 <= m["test/acc"] <= 1 and "test/shapley/text" in m and "test/shapley/visual" in m


def test_paper_preset_composes_with_the_small_backbone(kaggle, minilm):
    """backbone=small swaps in the from-scratch TokenEncoder: the preset must not pin text-model keys."""
    from conftest import compose_cfg
    from mmbalance.config import build, validate
    from mmbalance.models.build import build_model

    cfg = compose_cfg(["experiment=paper_food101", "backbone=small", f"dataset.root={kaggle}",
                       f"dataset.tokenizer={minilm}", f"dataset.image_size={S}"], fast=False)
    validate(cfg)
    assert cfg.trainer.epochs == 70 and cfg.trainer.batch_size == 64 and cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == pytest.approx(1e-4)
    splits = build(cfg.dataset)
    model = build_model(splits.modalities, cfg.backbone, splits.num_classes, "input").eval()
    assert type(model.encoders["text"]).__name__ == "TokenEncoder"
    from mmbalance.data.batch import collate_batch

    batch = collate_batch([splits.test[i] for i in range(4)])
    with torch.no_grad():
        out = model(batch.inputs)
        absent = model(batch.inputs, absent=["text"])
    assert out.logits.shape == (4, 3) and torch.isfinite(absent.logits).all()


def test_prepare_rebuilds_the_cache_when_an_image_is_replaced_under_the_same_name(tmp_path):
    from PIL import Image

    root = make_food101(tmp_path / "raw", n_train=3, n_test=1)
    out = tmp_path / "prep"
    run_prepare("food101", root, out, workers=1, progress=False, image_size=S)
    row = next(int(r["cache_row"]) for r in PreparedFolder(out).rows(["id", "cache_row"])
               if r["id"] == "train/sushi/sushi_0.jpg")
    Image.new("RGB", (48, 40), (0, 0, 255)).save(root / "images" / "train" / "sushi" / "sushi_0.jpg")  # new content
    run_prepare("food101", root, out, workers=1, progress=False, image_size=S)
    cache = np.memmap(out / f"images_{S}.u8", dtype=np.uint8, mode="r", shape=(12, S, S, 3))
    assert (np.abs(cache[row].astype(int) - [0, 0, 255]) <= 2).all()  # the new photo, not the old one
    key = json.loads((out / "food101_prepared.json").read_text())["candidates_sha1"]  # what the loader checks
    assert json.loads((out / f"images_{S}.u8.json").read_text())["candidates_sha1"] == key
