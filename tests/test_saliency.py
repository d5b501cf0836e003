"""SACT saliency post-processing and ponder-map figures."""

import math

import pytest
import torch

from ponder.models.act import ACTCifarResNet
from ponder.pondermap import ponder_maps, write_ponder_maps
from ponder.saliency import center_bias, gaussian_blur, normalize01, saliency_map


def test_constant_map_gives_only_the_centre_bias():
    sal = saliency_map(torch.full((30, 50), 7.0))
    assert torch.allclose(sal, 0.005 * center_bias(30, 50), atol=1e-7)


def test_saliency_is_invariant_to_affine_rescaling_of_the_ponder_map():
    torch.manual_seed(0)
    m = torch.rand(40, 60)
    assert torch.allclose(saliency_map(m), saliency_map(3.0 * m + 11.0), atol=1e-5)
    assert normalize01(m).min() == 0 and normalize01(m).max() == 1


def test_blur_of_a_point_is_a_gaussian_with_the_given_std():
    m = torch.zeros(101, 121)
    m[50, 60] = 1.0
    sal = saliency_map(m, sigma=10.0, gamma=0.0)
    assert sal.sum().item() == pytest.approx(1.0, rel=1e-4)  # blur preserves mass away from the borders
    for d in (5, 10, 20):
        assert (sal[50, 60 + d] / sal[50, 60]).item() == pytest.approx(math.exp(-d * d / 200), rel=1e-3)
        assert (sal[50 - d, 60] / sal[50, 60]).item() == pytest.approx(math.exp(-d * d / 200), rel=1e-3)


def test_gamma_adds_centre_bias_peaking_at_the_image_centre():
    m = torch.zeros(21, 31)
    m[0, 0] = 1.0
    diff = saliency_map(m, sigma=2.0, gamma=0.5) - saliency_map(m, sigma=2.0, gamma=0.0)
    assert torch.allclose(diff, 0.5 * center_bias(21, 31))
    assert center_bias(21, 31)[10, 15] == 1.0 and center_bias(21, 31).argmax() == 10 * 31 + 15


def test_blur_on_maps_smaller_than_the_kernel_and_bad_inputs():
    assert gaussian_blur(torch.rand(5, 3), 10.0).shape == (5, 3)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        saliency_map(torch.rand(2, 5, 5))
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(torch.rand(5, 5), 0.0)


def _model():
    torch.manual_seed(0)
    model = ACTCifarResNet(14, num_classes=10, spatial=True)
    with torch.no_grad():
        for stage in model.halting:
            for branch in stage:
                branch.local.weight.normal_(0, 0.5)
                branch.local.bias.zero_()
    return model.eval()


def test_ponder_maps_at_image_resolution_for_non_square_images():
    model = _model()
    images = torch.randn(2, 3, 40, 24)
    maps = ponder_maps(model, images)
    out = model(images)
    assert [m.shape for m in maps["stages"]] == [(2, 40, 24)] * 3
    assert torch.allclose(maps["total"], sum(maps["stages"]))
    # nearest upsampling: stage 2 (20x12) pixel (i, j) covers image pixels (2i..2i+1, 2j..2j+1)
    assert torch.allclose(maps["stages"][1][:, ::2, ::2], out.ponder[1], atol=1e-5)
    assert len(maps["units"]) == 6
    assert maps["units_run"].min() >= 3 and maps["units_run"].max() <= 6
    assert maps["units_run"].min() < maps["units_run"].max()


def test_write_ponder_maps_from_a_run_directory(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    from ponder.config import RunConfig
    from ponder.engine.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_weights

    cfg = RunConfig()
    cfg.model.name, cfg.model.kwargs = "sact_resnet32_cifar", {}
    cfg.data.dataset = "cifar10"
    run = tmp_path / "run"
    run.mkdir()
    cfg.save(run / CONFIG_FILE)
    real = ACTCifarResNet(32, spatial=True)
    save_weights(real, run / WEIGHTS_FILE)
    img = tmp_path / "cat.png"
    Image.fromarray((torch.rand(30, 50, 3) * 255).byte().numpy()).save(img)
    written = write_ponder_maps(run, [img], out_dir=tmp_path / "maps", saliency=True)
    assert [p.name for p in written] in (["cat_ponder.png"], ["cat_ponder.npz"])
    assert written[0].stat().st_size > 1000
