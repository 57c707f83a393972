"""Pretrained backbones: the text transformer (offline MiniLM), timm ViT, timm weights for ResNet18, the
from-scratch TokenEncoder, the Tokenizer, offline errors, and FLOP counting with these encoders."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fixtures_food101 import minilm_dir
from mmbalance.data.text import Tokenizer
from mmbalance.errors import UserError
from mmbalance.metrics.flops import count_flops, write_fvcore_table
from mmbalance.models.encoders import ResNet18Encoder, TokenEncoder
from mmbalance.models.fusion import build_fusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.pretrained import TextTransformerEncoder, ViTEncoder

L = 16
TINY_VIT = dict(model="vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2)
_CACHE: dict = {}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def minilm():
    return minilm_dir()


def text_encoder(minilm, pooling="cls"):
    """TextTransformerEncoder on the offline MiniLM, loaded once and deep-copied (loading takes ~1 s);
    "cls" and "mean" differ only in the pooling step, so one load serves both."""
    if "enc" not in _CACHE:
        _CACHE["enc"] = TextTransformerEncoder((L,), model=minilm, pooling="cls")
    enc = copy.deepcopy(_CACHE["enc"])
    enc.pooling = pooling
    return enc


def fake_hf_cache(cache: Path, repo: str, state: dict) -> Path:
    """A Hugging Face hub cache holding `state` as <repo>/model.safetensors at revision main."""
    from safetensors.torch import save_file

    folder = cache / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    return snap / "model.safetensors"


# ------------------------------------------------------------------------------------------- text transformer


def test_text_encoder_masks_padding_and_survives_all_padding_rows(minilm):
    tok = Tokenizer(minilm, max_length=L)
    ids = torch.from_numpy(tok(["apple pie with cinnamon", "salmon sushi rolls", ""]))
    ids[2] = 0  # an absent modality: every id zeroed
    for pooling in ("cls", "mean"):
        enc = text_encoder(minilm, pooling).eval()
        assert enc.out_dim == 384 and enc.kinds == ("tokens",)
        with torch.no_grad():
            out = enc(ids)
            # padding is masked: the same title with a different amount of padding gives the same feature
            enc.in_shape = (L + 8,)
            padded = enc(torch.cat([ids, torch.zeros(3, 8, dtype=torch.long)], dim=1))
            enc.in_shape = (L,)
        assert out.shape == (3, 384) and torch.isfinite(out).all()
        torch.testing.assert_close(out[:2], padded[:2], atol=1e-4, rtol=1e-4)
        # zeroed rows all map to one constant vector (the cheap absent-feature path relies on it)
        with torch.no_grad():
            zeros = enc(torch.zeros(4, L, dtype=torch.long))
        assert torch.isfinite(zeros).all() and torch.allclose(zeros, zeros[:1].expand(4, -1))
    enc = text_encoder(minilm).train()
    enc(ids).pow(2).sum().backward()
    assert enc.transformer.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert getattr(enc.transformer, "pooler", None) is None  # unused, so no parameter without gradients


def test_text_encoder_options(minilm):
    ids = torch.randint(1, 2000, (2, L))
    proj = TextTransformerEncoder((L,), model=minilm, pooling="pooler", out_dim=32, freeze=True)
    assert proj.out_dim == 32 and proj.transformer.pooler is not None
    proj.train()
    assert not proj.transformer.training and proj.proj.training  # frozen transformer: no dropout
    proj(ids).sum().backward()
    assert all(p.grad is None for p in proj.transformer.parameters()) and proj.proj.weight.grad is not None
    with pytest.raises(UserError, match="pooling"):
        TextTransformerEncoder((L,), model=minilm, pooling="max")
    with pytest.raises(UserError, match="vocabulary"):
        text_encoder(minilm)(torch.full((1, L), 40000))
    with pytest.raises(UserError, match="per-sample shape"):
        TextTransformerEncoder((3, L), model=minilm)


def test_a_tokenizer_padding_id_other_than_zero_round_trips(minilm):
    """RoBERTa-style tokenizers pad with 1: the stored ids swap it with 0 and the encoder swaps back."""
    tok = Tokenizer(minilm, max_length=L)
    texts = ["grilled salmon", "[UNK] tacos"]
    plain = tok(texts)
    tok.pad_id = 100  # pretend the model's padding id is 100 ([UNK]'s id in this vocabulary)
    stored = tok(texts)
    assert (stored[plain == 0] == 100).all() and (stored[plain == 100] == 0).all() and (plain == 100).any()
    assert (stored[(plain != 0) & (plain != 100)] == plain[(plain != 0) & (plain != 100)]).all()
    enc = text_encoder(minilm).eval()
    enc.pad_id = 100
    seen = {}
    forward = enc.transformer.forward

    def spy(input_ids, attention_mask):
        seen.update(ids=input_ids, mask=attention_mask)
        return forward(input_ids=input_ids, attention_mask=attention_mask)

    enc.transformer.forward = spy
    with torch.no_grad():
        enc(torch.from_numpy(stored))
    expect_mask = torch.from_numpy(stored != 0)
    expect_mask[:, 0] = True
    assert torch.equal(seen["ids"], torch.from_numpy(plain)) and torch.equal(seen["mask"].bool(), expect_mask)


def test_tokenizer_sources_and_errors(minilm, tmp_path, monkeypatch):
    by_folder = Tokenizer(minilm, max_length=12)(["Crème brûlée, unaffordable!"])
    by_vocab = Tokenizer(str(Path(minilm) / "vocab.txt"), max_length=12)(["Crème brûlée, unaffordable!"])
    assert by_folder.dtype.name == "int64" and by_folder.shape == (1, 12)
    assert (by_folder == by_vocab).all() and by_folder[0, 0] == 101  # [CLS] of bert-base-uncased
    long = Tokenizer(minilm, max_length=6)(["one two three four five six seven"])
    assert long.shape == (1, 6) and long[0, -1] == 102  # truncated, still ends with [SEP]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match=f"not available offline.*{tmp_path / 'hub'}"):
        Tokenizer("bert-base-uncased")
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer(str(tmp_path / "nope"))


def test_missing_text_model_is_a_clear_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="no download is attempted") as info:
        TextTransformerEncoder((L,), model="bert-base-uncased")
    assert str(tmp_path / "hub") in str(info.value) and "hf download bert-base-uncased" in str(info.value)
    with pytest.raises(UserError, match="is not a folder"):
        TextTransformerEncoder((L,), model=str(tmp_path / "models" / "bert"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"from the folder {tmp_path / 'empty'}"):
        TextTransformerEncoder((L,), model=str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------- TokenEncoder


@pytest.mark.parametrize("layers", [0, 1])
def test_token_encoder_from_scratch(layers):
    enc = TokenEncoder((L,), vocab_size=500, d_model=16, nhead=2, layers=layers, out_dim=8)
    ids = torch.randint(1, 500, (3, L))
    ids[1, 5:] = 0
    ids[2] = 0
    out = enc(ids)
    assert out.shape == (3, 8) and torch.isfinite(out).all()
    out.sum().backward()
    assert enc.embedding.weight.grad[ids[0]].abs().sum() > 0
    assert enc.embedding.weight.grad[0].abs().sum() == 0  # padding_idx: padding never learns
    enc.eval()
    with torch.no_grad():
        zeros = enc(torch.zeros(2, L, dtype=torch.long))
        # only the real tokens matter: what sits at padded positions is ignored
        a = enc(ids[1:2])
        noisy = ids[1:2].clone()
        noisy[0, 5:] = 0
        torch.testing.assert_close(enc(noisy), a)
    assert torch.allclose(zeros[0], zeros[1])
    if layers == 0:  # a bag of words: the projected mean of the real tokens' embeddings
        h = enc.embedding(ids[1, :5]) + enc.pos_embedding[0, :5]
        torch.testing.assert_close(a[0], enc.proj(h.mean(0)), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="vocabulary has 500"):
        enc(torch.full((1, L), 500))
    with pytest.raises(UserError, match="int64"):
        enc(torch.zeros(1, L))


# -------------------------------------------------------------------------------------------------------- ViT


def test_vit_image_and_frames():
    img = ViTEncoder((3, 32, 32), **TINY_VIT).eval()
    assert img.out_dim == 32 and img.net.patch_embed.img_size == (32, 32)
    x = torch.randn(2, 3, 32, 32)
    assert img(x).shape == (2, 32)
    frames = ViTEncoder((3, 3, 32, 32), **TINY_VIT).eval()  # T=3 RGB frames
    frames.load_state_dict(img.state_dict())
    clip = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        per_frame = torch.stack([img(clip[:, t]) for t in range(3)], dim=1).mean(dim=1)
        torch.testing.assert_close(frames(clip), per_frame, atol=1e-5, rtol=1e-5)
    flow = ViTEncoder((2, 48, 32), **TINY_VIT)
    assert flow(torch.randn(1, 2, 48, 32)).shape == (1, 32)
    with pytest.raises(UserError, match="patch size"):
        ViTEncoder((3, 30, 32), **TINY_VIT)
    with pytest.raises(UserError, match="not a timm model"):
        ViTEncoder((3, 32, 32), model="no_such_vit")


def test_vit_pretrained_from_a_local_file_and_the_hf_cache(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    source = ViTEncoder((3, 32, 32), **TINY_VIT)
    state = {k: v + 0.25 for k, v in source.net.state_dict().items()}
    file = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    # a larger image: timm resamples the 2x2 position grid to 3x3, everything else loads as saved
    big = ViTEncoder((3, 48, 48), pretrained=True, weights_path=str(file), **TINY_VIT)
    torch.testing.assert_close(big.net.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    assert big.net.pos_embed.shape[1] == 1 + 9 and big.weights_file == str(file)
    # no weights_path: the checkpoint is found in the Hugging Face cache where timm would have put it
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="no download is attempted") as info:
        ViTEncoder((3, 32, 32), pretrained=True, **TINY_VIT)
    assert "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k" in str(info.value)
    assert str(tmp_path / "hub") in str(info.value)
    cached = fake_hf_cache(tmp_path / "hub", "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", state)
    vit = ViTEncoder((3, 32, 32), pretrained=True, **TINY_VIT)
    assert vit.weights_file == str(cached)
    torch.testing.assert_close(vit.net.pos_embed, state["pos_embed"])
    with pytest.raises(UserError, match="does not exist"):
        ViTEncoder((3, 32, 32), pretrained=True, weights_path=str(tmp_path / "none.pth"), **TINY_VIT)


# ---------------------------------------------------------------------------------------- ResNet18 from timm


def test_resnet18_timm_weights_from_the_hf_cache_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torchhub"))
    with pytest.raises(UserError, match="timm/resnet18.a1_in1k") as info:
        ResNet18Encoder((3, 32, 32), pretrained=True, source="timm")
    assert str(tmp_path / "hub") in str(info.value) and "resnet18_a1_0-d63eafa0.pth" in str(info.value)
    import timm

    # a timm ResNet-18 checkpoint as timm exports it (no BatchNorm num_batches_tracked counters)
    state = {k: v + 0.5 for k, v in timm.create_model("resnet18").state_dict().items()
             if not k.endswith("num_batches_tracked")}
    fake_hf_cache(tmp_path / "hub", "timm/resnet18.a1_in1k", state)
    enc = ResNet18Encoder((1, 32, 32), pretrained=True, source="timm")
    torch.testing.assert_close(enc.net.layer3[0].downsample[0].weight, state["layer3.0.downsample.0.weight"])
    torch.testing.assert_close(enc.net.conv1.weight, state["conv1.weight"].mean(dim=1, keepdim=True))
    assert enc.out_dim == 512 and enc(torch.randn(2, 1, 32, 32)).shape == (2, 512)
    torch.save(state, tmp_path / "r18.pth")
    explicit = ResNet18Encoder((3, 32, 32), pretrained=True, source="timm", weights_path=str(tmp_path / "r18.pth"))
    torch.testing.assert_close(explicit.net.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    bad = {k: v for k, v in state.items() if not k.startswith("layer4")}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="layer4"):
        ResNet18Encoder((3, 32, 32), pretrained=True, source="timm", weights_path=str(tmp_path / "bad.pth"))
    with pytest.raises(UserError, match="source"):
        ResNet18Encoder((3, 32, 32), source="hub")


# --------------------------------------------------------------------------------------- FLOPs with these


def test_flop_counting_and_fvcore_table_with_pretrained_encoders(minilm, tmp_path):
    encoders = {"text": text_encoder(minilm), "visual": ViTEncoder((3, 32, 32), **TINY_VIT),
                "audio": ResNet18Encoder((1, 32, 32))}
    dims = {m: e.out_dim for m, e in encoders.items()}
    model = MultimodalModel(encoders, build_fusion("concat", dims, 3)).eval()
    ids = torch.randint(1, 2000, (2, L))
    ids[1, 6:] = 0
    inputs = {"text": ids, "visual": torch.randn(2, 3, 32, 32), "audio": torch.randn(2, 1, 32, 32)}
    with torch.no_grad():
        _, forward = count_flops(lambda: model(inputs).logits)
    # MiniLM's linear layers alone: 6 layers x (4 x 384^2 + 2 x 384 x 1536) MACs per token, x2 FLOPs
    bert_linear = 2 * 6 * (4 * 384 * 384 + 2 * 384 * 1536) * L * 2
    assert forward > bert_linear
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        model(inputs).logits.sum().backward()
    assert counter.get_total_flops() > 2.5 * forward  # backward ~2x forward
    model.eval()
    fv = write_fvcore_table(model, inputs, tmp_path / "flops_fvcore.txt")
    text = (tmp_path / "flops_fvcore.txt").read_text()
    # fvcore traces all three (or, if a future transformers breaks tracing, records why instead of raising)
    assert (fv is not None and "encoders.text" in text) or text.startswith("fvcore tracing failed")
    if fv is not None:
        assert fv == pytest.approx(forward / 2, rel=0.1)


def test_backbone_configs_validate_and_map_the_tokens_kind():
    from conftest import compose_cfg
    from mmbalance.config import validate

    for backbone, target in (("small", "TokenEncoder"), ("resnet18", "TextTransformerEncoder"),
                             ("vit", "TextTransformerEncoder")):
        cfg = compose_cfg([f"backbone={backbone}"], fast=False)
        validate(cfg)
        assert cfg.backbone.encoders.tokens._target_.endswith(target)
    assert compose_cfg(["backbone=vit"], fast=False).backbone.encoders.image._target_.endswith("ViTEncoder")
