"""The 9-channel input transform gives the documented values."""
import torch

from titan.models.frequency import FrequencyInput


def test_srm_kernel_buffer_is_the_contract():
    k = FrequencyInput().srm_kernel
    assert k.shape == (3, 1, 3, 3)
    expected = torch.zeros(3, 1, 3, 3)
    expected[0, 0, 1, 1] = expected[2, 0, 1, 1] = -1
    expected[1, 0] = torch.tensor([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], dtype=torch.float)
    assert torch.equal(k, expected)


def test_constant_image_channels():
    x = torch.full((1, 3, 32, 32), 0.25)
    y = FrequencyInput()(x)
    assert y.shape == (1, 9, 32, 32)
    assert torch.allclose(y[:, :3], torch.full_like(y[:, :3], -0.5))  # (x-0.5)/0.5
    inner = y[:, 6:, 1:-1, 1:-1]
    assert torch.allclose(inner[:, 1], torch.zeros_like(inner[:, 1]), atol=1e-6)  # Laplacian of constant = 0
    assert torch.allclose(inner[:, 0], torch.full_like(inner[:, 0], -0.75))  # −1 centre tap × 3
    # FFT of a constant: only DC is non-zero: |DC| = 0.25·32·32 = 256.
    amp = torch.log1p(torch.fft.rfft2(x).abs())
    assert torch.isclose(amp[0, 0, 0, 0], torch.log1p(torch.tensor(256.0)))
    assert torch.isfinite(y).all()


def test_fft_channel_is_normalised_log_amplitude_resized():
    x = torch.rand(2, 3, 16, 16)
    y = FrequencyInput()(x)
    amp = (torch.log1p(torch.fft.rfft2(x).abs()) - 3) / 3
    ref = torch.nn.functional.interpolate(amp, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(y[:, 3:6], ref, atol=1e-5)


def test_srm_residual_of_vertical_edge():
    x = torch.zeros(1, 3, 8, 8)
    x[..., 4:] = 1.0
    y = FrequencyInput()(x)
    lap = y[0, 7]  # green channel Laplacian ×3
    assert lap[3, 3] == -3.0 and lap[3, 4] == 3.0 and lap[3, 1] == 0.0
