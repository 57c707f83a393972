"""Per-modality encoders: shapes, gradients, time pooling, pretrained-weight handling, FLOP visibility."""

import copy
from pathlib import Path

import pytest
import torch
from hydra.utils import get_object
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmbalance.errors import UserError
from mmbalance.models.encoder_utils import check_input
from mmbalance.models.encoders import MLPEncoder, ResNet18Encoder, SmallCNN, TokenEncoder, TransformerEncoder

B = 3

_RESNETS: dict = {}


def resnet(shape):
    """ResNet18Encoder(shape), built once per shape and deep-copied (building one takes ~1 s on 2 CPUs)."""
    if shape not in _RESNETS:
        _RESNETS[shape] = ResNet18Encoder(shape)
    return copy.deepcopy(_RESNETS[shape])


# (encoder factory, per-sample shape): every kind each encoder accepts, kept tiny for CPU
CASES = {
    "smallcnn-image-digits": (lambda s: SmallCNN(s, width=8, out_dim=16), (1, 8, 8)),
    "smallcnn-image-rgb": (lambda s: SmallCNN(s, width=8, out_dim=16), (3, 16, 16)),
    "smallcnn-spectrogram": (lambda s: SmallCNN(s, width=8, out_dim=16), (1, 40, 32)),
    "smallcnn-spectrogram-odd": (lambda s: SmallCNN(s, width=8, out_dim=16), (1, 129, 63)),
    "smallcnn-frames-flow": (lambda s: SmallCNN(s, width=8, out_dim=16), (3, 2, 16, 16)),
    "resnet18-image-1ch": (resnet, (1, 32, 32)),
    "resnet18-image-2ch": (resnet, (2, 32, 32)),
    "resnet18-image-3ch": (resnet, (3, 32, 32)),
    "resnet18-frames": (resnet, (2, 3, 32, 32)),
    "mlp-vector": (lambda s: MLPEncoder(s, hidden=32, out_dim=16), (20,)),
    "mlp-sequence": (lambda s: MLPEncoder(s, hidden=32, out_dim=16), (6, 20)),
    "transformer-sequence": (lambda s: TransformerEncoder(s, d_model=16, nhead=2, dim_feedforward=32), (7, 5)),
    "transformer-vector": (lambda s: TransformerEncoder(s, d_model=16, nhead=2, out_dim=12), (5,)),
}

FIRST_LAYER = {
    SmallCNN: lambda e: e.features[0].weight,
    ResNet18Encoder: lambda e: e.net.conv1.weight,
    MLPEncoder: lambda e: e.mlp[0].weight,
    TransformerEncoder: lambda e: e.input_proj.weight,
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("case", list(CASES))
def test_shape_finite_and_gradient_reaches_first_layer(case):
    make, shape = CASES[case]
    enc = make(shape)
    enc.train()
    x = torch.randn(B, *shape)
    out = enc(x)
    assert out.shape == (B, enc.out_dim)
    assert isinstance(enc.out_dim, int)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    g = FIRST_LAYER[type(enc)](enc).grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# channel variants of ResNet18 add nothing here; skip them to keep the file fast
ZERO_CASES = [c for c in CASES if c not in ("resnet18-image-2ch", "resnet18-image-3ch")]


@pytest.mark.parametrize("case", ZERO_CASES)
def test_eval_zero_input_gives_one_constant_vector(case):
    make, shape = CASES[case]
    enc = make(shape).eval()
    with torch.no_grad():
        out = enc(torch.zeros(B, *shape))
        single = enc(torch.zeros(1, *shape))
    assert torch.equal(out, out[:1].expand_as(out))
    torch.testing.assert_close(single, out[:1])


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda s: SmallCNN(s, width=8, out_dim=16), (4, 2, 12, 12)),
        (resnet, (3, 1, 32, 32)),
    ],
    ids=["smallcnn", "resnet18"],
)
def test_frames_are_the_time_mean_of_per_frame_features(make, shape):
    enc = make(shape).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        pooled = enc(x)
        per_frame = torch.stack([enc(x[:, t : t + 1]) for t in range(shape[0])], dim=1)
    torch.testing.assert_close(pooled, per_frame.mean(dim=1), rtol=1e-5, atol=1e-5)


def test_smallcnn_uses_kernels_and_keeps_a_frequency_grid():
    spec = SmallCNN((1, 40, 32))
    assert spec.pool == "time" and spec.grid == (4, 1)
    img = SmallCNN((1, 8, 8))
    assert img.pool == "grid" and img.grid == (4, 4)
    assert SmallCNN((3, 2, 16, 16)).pool == "grid"
    assert SmallCNN((1, 40, 32), pool="grid").grid == (4, 4)
    convs = [m for m in spec.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(c.weight.dim() == 4 for c in convs)
    # moving energy between frequency bands must change the feature (global pooling would not see it)
    spec.eval()
    low = torch.zeros(1, 1, 40, 32)
    low[:, :, 2:6] = 1.0
    high = torch.zeros(1, 1, 40, 32)
    high[:, :, 30:34] = 1.0
    with torch.no_grad():
        assert not torch.allclose(spec(low), spec(high))


def test_resnet18_out_dim_and_channels():
    for c in (1, 2, 3):
        enc = resnet((c, 32, 32))
        assert enc.out_dim == 512 and enc.net.conv1.in_channels == c
    with pytest.raises(UserError, match="channels"):
        ResNet18Encoder((4, 32, 32))


def test_resnet18_pretrained_missing_raises_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError, match="pretrained") as info:
        ResNet18Encoder((3, 32, 32), pretrained=True)
    assert "resnet18-f37072fd.pth" in str(info.value)
    with pytest.raises(UserError, match="pretrained"):
        ResNet18Encoder((1, 32, 32), pretrained=True, weights_path=str(tmp_path / "nope.pth"))


def test_resnet18_pretrained_from_local_file_averages_rgb_kernels(tmp_path):
    # a stand-in for torchvision's ImageNet state dict: a random RGB ResNet-18 plus an ImageNet fc
    state = {k: v + 0.5 for k, v in resnet((3, 32, 32)).net.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(state, path)
    flow = ResNet18Encoder((2, 32, 32), pretrained=True, weights_path=str(path))
    torch.testing.assert_close(flow.net.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    torch.testing.assert_close(flow.net.bn1.running_mean, state["bn1.running_mean"])
    mean = state["conv1.weight"].mean(dim=1, keepdim=True)
    torch.testing.assert_close(flow.net.conv1.weight, mean.expand(-1, 2, -1, -1))
    assert isinstance(flow.net.fc, nn.Identity)


def test_transformer_flops_are_counted_in_eval():
    enc = TransformerEncoder((10, 7)).eval()
    x = torch.randn(2, 10, 7)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
            enc(x)
        # two layers' attention + feed-forward dominate: far more than the input projection alone
        assert counter.get_total_flops() > 2 * 2 * 10 * 64 * 128 * 2


def test_transformer_layer_matches_the_standard_layer():
    enc = TransformerEncoder((6, 5), d_model=16, nhead=2, dim_feedforward=32, layers=1).eval()
    ours = enc.encoder.layers[0]
    ref = nn.TransformerEncoderLayer(16, 2, 32, 0.1, activation="gelu", batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())
    h = torch.randn(3, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(h), ref(h), rtol=1e-5, atol=1e-5)


def test_transformer_out_dim_default_and_max_len():
    assert TransformerEncoder((4, 3), d_model=32, nhead=4).out_dim == 32
    assert TransformerEncoder((4, 3), d_model=32, nhead=4, out_dim=10).out_dim == 10
    with pytest.raises(UserError, match="max_len"):
        TransformerEncoder((600, 3))
    with pytest.raises(UserError, match="nhead"):
        TransformerEncoder((4, 3), d_model=30, nhead=4)


def test_mlp_sequence_is_mean_pooled():
    seq = MLPEncoder((5, 8), hidden=16, out_dim=4).eval()
    vec = MLPEncoder((8,), hidden=16, out_dim=4).eval()
    vec.load_state_dict(seq.state_dict())
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(seq(x), vec(x.mean(dim=1)))


@pytest.mark.parametrize(
    "cls,shape",
    [(SmallCNN, (20,)), (ResNet18Encoder, (5, 4)), (MLPEncoder, (1, 8, 8)), (TransformerEncoder, (2, 1, 8, 8))],
)
def test_wrong_kind_is_a_user_error(cls, shape):
    with pytest.raises(UserError, match=cls.__name__):
        cls(shape)


def test_check_input_and_batch_rank():
    assert check_input("X", [3, 4], {2: "sequence"}) == (3, 4)
    with pytest.raises(UserError, match="X cannot encode"):
        check_input("X", (3,), {2: "sequence (T, D)"})
    enc = MLPEncoder((8,))
    with pytest.raises(UserError, match="rank"):
        enc(torch.randn(8))


def test_every_encoder_declares_its_kinds_and_backbones_use_it_for_those():
    """Encoders are named by `_target_` in conf/backbone/ (there is no encoder registry): each declares the modality
    kinds it accepts, and each backbone puts it only under kinds it accepts."""
    classes = {SmallCNN, ResNet18Encoder, MLPEncoder, TransformerEncoder, TokenEncoder}
    for file in sorted((Path(__file__).resolve().parents[1] / "conf" / "backbone").glob("*.yaml")):
        for kind, node in OmegaConf.load(file).encoders.items():
            cls = get_object(node._target_)
            assert kind in cls.kinds, f"{file.name}: encoders.{kind} is {cls.__name__}, which accepts {cls.kinds}"
            classes.add(cls)
    assert len(classes) >= 7  # the five here and the two pretrained ones (ViT, text transformer)
    for cls in classes:
        assert set(cls.kinds) <= {"image", "spectrogram", "frames", "vector", "sequence", "tokens"}
