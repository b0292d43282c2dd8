"""SimMIM masking, decoder shape and a loss that learns."""
import torch

from titan import build_backbone
from titan.models.simmim import SimMIM, random_patch_mask


def test_mask_ratio_is_exact_per_image():
    m = random_patch_mask(4, (4, 4), 0.4)
    assert m.shape == (4, 4, 4)
    assert (m.sum(dim=(1, 2)) == round(0.4 * 16)).all()
    assert not torch.equal(m[0], m[1]) or not torch.equal(m[1], m[2])


def test_decoder_reconstructs_nine_channels_at_full_resolution():
    model = SimMIM(build_backbone("atto"))
    assert isinstance(model.decoder[1], torch.nn.PixelShuffle)
    assert model.decoder[0].out_channels == 9 * 32 * 32 and model.decoder[0].kernel_size == (1, 1)
    loss, rec, mask = model(torch.rand(2, 3, 64, 64))
    assert rec.shape == (2, 9, 64, 64) and mask.shape == (2, 1, 64, 64)
    assert torch.isfinite(loss)


def test_loss_counts_masked_pixels_only():
    model = SimMIM(build_backbone("atto"))
    x = torch.rand(1, 3, 64, 64)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    loss, rec, pix = model(x, mask)
    target = model.encoder.preproc(x)
    manual = (rec - target).abs()[..., :32, :32].mean()
    assert torch.allclose(loss, manual, atol=1e-5)


def test_simmim_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = SimMIM(build_backbone("atto"))
    x = torch.rand(2, 3, 64, 64)
    mask = random_patch_mask(2, (2, 2), 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss, _, _ = model(x, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_simmim_owns_the_mask_token_and_the_backbone_knows_no_masking():
    import inspect

    from titan.models.convnextv2 import ConvNeXtV2

    enc = build_backbone("atto")
    assert list(inspect.signature(ConvNeXtV2.forward_maps).parameters) == ["self", "x9"]
    assert not any("mask" in k for k in enc.state_dict())
    m = SimMIM(enc, patch_size=32)
    assert m.mask_token.shape == (1, enc.dims[0], 1, 1)
    x9 = enc.preproc(torch.rand(2, 3, 64, 64))
    # No patch masked: the masked forward is the backbone's own.
    assert torch.allclose(m.masked_maps(x9, torch.zeros(2, 1, 16, 16)), enc.forward_maps(x9), atol=1e-5)


def test_ssl_state_written_before_masking_moved_to_simmim_still_loads_strictly():
    # The key layout today's (and the earlier) SimMIM training states hold: encoder.*, mask_token, decoder.0.*.
    enc = build_backbone("atto")
    old_keys = {f"encoder.{k}" for k in enc.state_dict()} | {"mask_token", "decoder.0.weight", "decoder.0.bias"}
    src = SimMIM(build_backbone("atto"), patch_size=32)
    old_state = {k: v.clone() for k, v in src.state_dict().items()}
    assert set(old_state) == old_keys
    dst = SimMIM(enc, patch_size=32)
    dst.load_state_dict(old_state)  # strict
    assert torch.equal(dst.mask_token, src.mask_token)
    # The SSL weights file is the encoder alone: it loads into a plain backbone for fine-tuning.
    build_backbone("atto").load_state_dict({k[len("encoder."):]: v for k, v in old_state.items() if k.startswith("encoder.")})
