"""The backbone and heads carry exactly the released checkpoint layout (docs/checkpoints.md)."""
import pytest
import torch

from titan import build_backbone, build_head


def contract_backbone(depths, dims):
    """Expected {key: shape}, written from docs/checkpoints.md, not from the model."""
    k = {"preproc.srm_kernel": (3, 1, 3, 3),
         "downsamples.0.0.weight": (dims[0], 9, 4, 4), "downsamples.0.0.bias": (dims[0],),
         "downsamples.0.1.norm.weight": (dims[0],), "downsamples.0.1.norm.bias": (dims[0],)}
    for i in range(1, 4):
        k[f"downsamples.{i}.0.norm.weight"] = (dims[i - 1],)
        k[f"downsamples.{i}.0.norm.bias"] = (dims[i - 1],)
        k[f"downsamples.{i}.1.weight"] = (dims[i], dims[i - 1], 2, 2)
        k[f"downsamples.{i}.1.bias"] = (dims[i],)
    for i, (depth, d) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            k[p + "dwconv.weight"] = (d, 1, 7, 7)
            k[p + "dwconv.bias"] = (d,)
            k[p + "norm.weight"] = (d,)
            k[p + "norm.bias"] = (d,)
            k[p + "pwconv1.weight"] = (4 * d, d)
            k[p + "pwconv1.bias"] = (4 * d,)
            k[p + "grn.gamma"] = (1, 1, 1, 4 * d)
            k[p + "grn.beta"] = (1, 1, 1, 4 * d)
            k[p + "pwconv2.weight"] = (d, 4 * d)
            k[p + "pwconv2.bias"] = (d,)
    k["norm.weight"] = (dims[-1],)
    k["norm.bias"] = (dims[-1],)
    return k


@pytest.mark.parametrize("variant,depths", [("v42", (3, 3, 12, 3)), ("v38", (3, 3, 9, 3))])
def test_backbone_state_dict_matches_release_layout(variant, depths):
    sd = build_backbone(variant).state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert got == contract_backbone(depths, (96, 192, 384, 768))


def test_small_variant_is_built_by_the_same_code():
    sd = build_backbone("atto").state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == contract_backbone((2, 2, 6, 2), (40, 80, 160, 320))


def test_linear_head_keys_and_probability():
    head = build_head("linear").eval()
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {"head.1.weight": (1, 768), "head.1.bias": (1,)}
    assert isinstance(head.head[0], torch.nn.Dropout) and head.head[0].p == 0.25
    f = torch.randn(4, 768)
    expected = torch.sigmoid(f @ head.head[1].weight.T + head.head[1].bias).squeeze(1)
    assert torch.allclose(torch.sigmoid(head(f)), expected, atol=1e-6)


def test_arcface_head_keys_and_probability():
    head = build_head("arcface").eval()
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "weight": (2, 768), "aux_head.weight": (2, 768), "aux_head.bias": (2,)}
    f = torch.randn(5, 768)
    ln = torch.nn.functional.layer_norm(f, (768,))
    cos = torch.nn.functional.normalize(ln) @ torch.nn.functional.normalize(head.weight).T
    expected = torch.softmax(30 * cos, dim=1)[:, 1]
    assert torch.allclose(torch.sigmoid(head(f)), expected, atol=1e-5)  # one logit: s·(cos₁ − cos₀)
    # The single logit is the same decision: sigmoid(logit) == softmax class 1.
    assert torch.allclose(torch.sigmoid(head(f)), expected, atol=1e-5)


def test_drop_path_is_off_by_default_and_optional():
    m = build_backbone("atto").train()
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(m(x), m(x))  # deterministic: no stochastic depth by default
    m2 = build_backbone("atto", drop_path_rate=0.5).train()
    m2.load_state_dict(m.state_dict())
    outs = {tuple(m2(x).flatten()[:4].tolist()) for _ in range(4)}
    assert len(outs) > 1


def test_forward_shapes_and_backward_on_small_variant():
    m, head = build_backbone("atto"), build_head("linear", 320)
    x = torch.rand(2, 3, 128, 128, requires_grad=True)
    logit = head(m(x))
    assert logit.shape == (2,)
    logit.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unknown_variant_and_head_are_errors():
    with pytest.raises(ValueError, match="unknown backbone variant"):
        build_backbone("v99")
    with pytest.raises(ValueError, match="unknown head"):
        build_head("softmax")


def test_highpass_stem_ignores_flat_patches_and_keeps_the_release_layout():
    hp, ref = build_backbone("atto", stem="highpass"), build_backbone("atto")
    assert {k: v.shape for k, v in hp.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    stem = hp.downsamples[0][0]  # (40, 9, 4, 4): every filter sums to zero over its patch
    assert torch.allclose(stem.weight.sum(dim=(2, 3)), torch.zeros(40, 9), atol=1e-6) and stem.weight.abs().sum() > 0
    # a flat 4×4 patch (any level, any channel) gives only the bias: patch means are invisible
    flat = torch.rand(2, 9, 1, 1).expand(2, 9, 8, 8)
    assert torch.allclose(stem(flat), stem.bias.view(1, -1, 1, 1).expand(2, -1, 2, 2), atol=1e-5)
    # the ConvNeXt V2 reference stem does see them
    assert ref.downsamples[0][0].weight.sum(dim=(2, 3)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unknown stem"):
        build_backbone("atto", stem="dct")


def test_highpass_stem_stays_zero_sum_while_training_and_projects_loaded_weights():
    from titan.models.convnextv2 import keep_stem_highpass
    m, head = build_backbone("atto"), build_head("linear", 320)
    w0 = m.downsamples[0][0].weight.detach().clone()  # standard init, e.g. loaded SSL weights
    opt = torch.optim.AdamW(list(m.parameters()) + list(head.parameters()), lr=1e-2)
    keep_stem_highpass(m, opt)
    w = m.downsamples[0][0].weight
    assert torch.allclose(w, w0 - w0.mean(dim=(2, 3), keepdim=True))  # projected once on registration
    x, y = torch.rand(4, 3, 64, 64), torch.tensor([0.0, 1.0, 0.0, 1.0])
    for _ in range(3):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(m(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.allclose(w, w0 - w0.mean(dim=(2, 3), keepdim=True))  # it trained...
    assert torch.allclose(w.sum(dim=(2, 3)), torch.zeros(40, 9), atol=1e-5)  # ...and stayed high-pass
