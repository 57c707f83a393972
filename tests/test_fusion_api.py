"""The per-modality block API of the fusion heads, on every registered head, and that methods use only it."""

import re
from pathlib import Path

import pytest
import torch
from mmbalance.errors import UserError
from mmbalance.models import fusion as fusion_module
from mmbalance.models.fusion import FUSIONS, Fusion, build_fusion, fusion_choices, fusions_with

METHODS_DIR = Path(__file__).resolve().parents[1] / "src" / "mmbalance" / "methods"
CAPABILITIES = ("has_unimodal_logits", "has_linear_blocks")
MODALITY_SETS = [("a", "b"), ("a", "b", "c")]


def _head(name, mods, dims=None, seed=0):
    torch.manual_seed(seed)
    head = build_fusion(name, dims or {m: 3 + i for i, m in enumerate(mods)}, 4)
    with torch.no_grad():  # a non-zero bias everywhere, so bias shares are really tested
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return head


def _features(head, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, d, generator=g) for m, d in head.dims.items()}


def _is_additive(head) -> bool:
    """Whether f(z) is a sum of per-modality terms: the mixed second difference over two modalities is 0."""
    first, second = head.modalities[:2]
    z, z2 = _features(head, seed=1), _features(head, seed=2)

    def f(swap):
        return head({m: (z2[m] if m in swap else z[m]) for m in head.modalities})

    mixed = f(()) - f((first,)) - f((second,)) + f((first, second))
    return bool(mixed.abs().max() < 1e-5)


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_capabilities_are_declared_booleans_and_consistent(name):
    head = _head(name, ("a", "b"))
    assert isinstance(head, Fusion)
    for cap in CAPABILITIES:
        assert isinstance(getattr(head, cap), bool), cap
    # linear blocks always give per-modality logits (their sum is the fused logits)
    assert head.has_unimodal_logits or not head.has_linear_blocks


@pytest.mark.parametrize("mods", MODALITY_SETS)
@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_capabilities_are_honest(name, mods):
    """A head claims linear blocks exactly when its fused logits are additive over modalities."""
    head = _head(name, mods)
    assert head.has_linear_blocks == _is_additive(head)


@pytest.mark.parametrize("mods", MODALITY_SETS)
@pytest.mark.parametrize("name", fusions_with("has_linear_blocks"))
def test_blocks_reproduce_the_fused_and_per_modality_logits(name, mods):
    head = _head(name, mods)
    z = _features(head)
    blocks = {m: z[m] @ head.weight_block(m).t() + head.bias_share(m) for m in mods}
    for m in mods:
        assert head.weight_block(m).shape == (head.num_classes, head.dims[m])
        assert head.bias_share(m).shape == (head.num_classes,)
    uni = head.unimodal_logits(z)
    assert set(uni) == set(mods)
    for m in mods:
        torch.testing.assert_close(uni[m], blocks[m], rtol=0, atol=1e-6)
    torch.testing.assert_close(sum(blocks.values()), head(z), rtol=0, atol=1e-5)
    torch.testing.assert_close(sum(uni.values()), head(z), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", fusions_with("has_linear_blocks"))
def test_weight_blocks_are_differentiable_views_of_the_head(name):
    head = _head(name, ("a", "b"))
    head.weight_block("a").sum().backward()
    touched = [p for p in head.parameters() if p.grad is not None and p.grad.any()]
    assert touched, "the weight block must be a view of the head's parameters"


@pytest.mark.parametrize("mods", MODALITY_SETS)
@pytest.mark.parametrize("name", fusions_with("has_linear_blocks"))
def test_block_parameters_own_exactly_what_each_modality_logits_depend_on(name, mods):
    head = _head(name, mods)
    z = _features(head)
    ids = {id(p) for p in head.parameters()}
    covered = set()
    for m in mods:
        owned = head.block_parameters(m)
        assert all(id(p) in ids for p, _ in owned)
        covered |= {id(p) for p, _ in owned}
        head.zero_grad(set_to_none=True)
        head.unimodal_logits(z)[m].pow(2).sum().backward()
        masks = {id(p): mask for p, mask in owned}
        for p in head.parameters():
            if id(p) not in masks:  # another modality's block: no gradient from m's logits
                assert p.grad is None or not p.grad.any()
            elif masks[id(p)] is not None:  # a shared parameter: the gradient stays in m's entries
                assert mask_only(p.grad, masks[id(p)])
                assert masks[id(p)].shape == p.shape and set(masks[id(p)].unique().tolist()) <= {0.0, 1.0}
    assert covered == ids, "every head parameter belongs to some modality's block"


def mask_only(grad, mask):
    return bool((grad * (1 - mask)).abs().max() == 0) and bool((grad * mask).abs().max() > 0)


@pytest.mark.parametrize("mods", MODALITY_SETS)
@pytest.mark.parametrize("name", fusions_with("has_linear_blocks"))
def test_load_shared_head_builds_the_fixed_weight_fusion(name, mods):
    dims = {m: 3 for m in mods}
    head = _head(name, mods, dims=dims)
    shared = torch.nn.Linear(3, 4)
    coefficients = {m: 0.5 + 0.25 * i for i, m in enumerate(mods)}
    head.load_shared_head(shared.weight, shared.bias, coefficients)
    z = _features(head)
    expected = sum(c * shared(z[m]) for m, c in coefficients.items())
    torch.testing.assert_close(head(z), expected, rtol=0, atol=1e-5)
    for m, c in coefficients.items():
        torch.testing.assert_close(head.weight_block(m), c * shared.weight, rtol=0, atol=1e-6)
    assert all(p.is_leaf and p.requires_grad for p in head.parameters())  # still trainable leaves


@pytest.mark.parametrize("name", fusions_with("has_linear_blocks"))
def test_load_shared_head_refuses_a_head_that_does_not_fit(name):
    head = _head(name, ("a", "b"))  # feature sizes 3 and 4
    shared = torch.nn.Linear(3, 4)
    with pytest.raises(UserError, match="feature sizes"):
        head.load_shared_head(shared.weight, shared.bias, {"a": 0.5, "b": 0.5})
    head = _head(name, ("a", "b"), dims={"a": 3, "b": 3})
    with pytest.raises(UserError, match="one coefficient per modality"):
        head.load_shared_head(shared.weight, shared.bias, {"a": 1.0})


@pytest.mark.parametrize("name", sorted(set(FUSIONS) - set(fusions_with("has_linear_blocks"))))
def test_a_head_without_linear_blocks_says_so_through_every_accessor(name):
    head = _head(name, ("a", "b"), dims={"a": 3, "b": 3})
    z = _features(head)
    shared = torch.nn.Linear(3, 4)
    calls = {
        "weight_block": lambda: head.weight_block("a"),
        "bias_share": lambda: head.bias_share("a"),
        "block_parameters": lambda: head.block_parameters("a"),
        "load_shared_head": lambda: head.load_shared_head(shared.weight, shared.bias, {"a": 0.5, "b": 0.5}),
    }
    if not head.has_unimodal_logits:
        calls["unimodal_logits"] = lambda: head.unimodal_logits(z)
    before = [p.detach().clone() for p in head.parameters()]
    for what, call in calls.items():
        with pytest.raises(UserError, match=f"{type(head).__name__}.*concat or sum"):
            call()
    assert all(torch.equal(a, b) for a, b in zip(before, head.parameters()))


def test_the_suggested_heads_come_from_the_declared_capabilities():
    assert fusions_with("has_linear_blocks") == ["concat", "sum"]
    assert fusion_choices("has_linear_blocks") == "concat or sum"
    assert fusion_choices("has_unimodal_logits") == "concat or sum"


def _fusion_internals() -> set[str]:
    """The attribute names the registered heads add beyond the base class: what methods must not touch."""
    base = Fusion({"a": 3, "b": 3}, 4)
    names = set()
    for cls in FUSIONS.values():
        head = cls({"a": 3, "b": 3}, 4)
        names |= set(vars(head)) | set(head._modules) | set(head._parameters) | set(vars(cls))
    api = set(dir(base)) | set(vars(base))
    return {n for n in names - api if not n.startswith("__")}


def _code(path: Path) -> str:
    """The module's text without comments, so a "# concat: ..." remark is not a violation."""
    return "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())


def test_methods_use_only_the_fusion_api():
    classes = {cls.__name__ for cls in FUSIONS.values()}
    classes |= {n for n, obj in vars(fusion_module).items()
                if isinstance(obj, type) and issubclass(obj, Fusion) and obj is not Fusion}
    internals = _fusion_internals()
    assert {"fc", "slices", "heads"} <= internals  # the check below really covers the known internals
    attr = re.compile(r"fusion\w*\s*\)?\s*\.\s*(\w+)")
    problems = []
    files = sorted(METHODS_DIR.glob("*.py"))
    assert len(files) > 5
    for path in files:
        code = _code(path)
        for cls in classes:
            if re.search(rf"\b{cls}\b", code):
                problems.append(f"{path.name} names {cls}")
        if re.search(r"isinstance\([^)]*fusion", code):
            problems.append(f"{path.name} isinstance-checks a fusion head")
        for name in attr.findall(code):
            if name in internals:
                problems.append(f"{path.name} reaches into fusion.{name}")
        if re.search(r"\.slices\b", code):
            problems.append(f"{path.name} reaches into .slices")
    assert not problems, problems


@pytest.mark.parametrize("overrides, message", [
    (["method=mmpareto", "method.unimodal_head=slice", "backbone.fusion=gated"],
     "method mmpareto needs per-modality logits (method.unimodal_head=slice), which backbone.fusion=gated does not "
     "define; use backbone.fusion=concat or sum, or method.unimodal_head=aux"),
    (["method=greedy", "backbone.fusion=film"],
     "method greedy needs per-modality logits (method.loss=unimodal), which backbone.fusion=film does not define; "
     "use backbone.fusion=concat or sum, or method.loss=fused"),
    (["method=hybrid_ogm_ge_mbsd", "backbone.fusion=film"],
     "method.parts[0] (ogm_ge): method ogm_ge needs per-modality logits, which backbone.fusion=film does not define"),
])
def test_a_fusion_refusal_names_the_fusion_key_the_option_behind_it_and_the_part(overrides, message):
    from conftest import compose_cfg
    from test_methods import make_run

    with pytest.raises(UserError) as err:
        make_run(compose_cfg(["dataset=synthetic", *overrides]))
    assert message in str(err.value)


def test_fusion_kwargs_are_checked_against_the_chosen_heads_arguments_before_anything_is_built():
    from conftest import compose_cfg

    from mmbalance.config import validate
    from mmbalance.errors import ConfigError

    validate(compose_cfg(["backbone.fusion=gated", "+backbone.fusion_kwargs.hidden=32"]))
    for overrides, message in [
        (["backbone.fusion=gated", "+backbone.fusion_kwargs.hiden=32"],
         "backbone.fusion_kwargs.hiden: backbone.fusion=gated takes no argument 'hiden' (did you mean hidden? it "
         "takes: hidden)"),
        (["+backbone.fusion_kwargs.hidden=32"], "backbone.fusion=concat takes no argument 'hidden' (it takes: none)"),
        (["backbone.fusion=film", "+backbone.fusion_kwargs.hidden=abc"], "backbone.fusion_kwargs.hidden"),
    ]:
        with pytest.raises(ConfigError) as err:
            validate(compose_cfg(overrides))
        assert message in str(err.value)
