import pytest
import torch

from dpar.pipeline.evaluate import (
    feature_statistics,
    fid,
    flops_to_target,
    frechet_distance,
    inception_extractor,
    patch_statistics,
)


def _small_extractor():
    """A fixed random conv net: images [B, 3, H, W] -> features [B, 8]."""
    torch.manual_seed(5)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten())
    return lambda images: network(images)


def test_fid_with_a_test_feature_extractor():
    extractor = _small_extractor()
    images = torch.rand(64, 3, 16, 16)
    assert abs(fid(images, images.clone(), extractor, batch_size=10)) < 1e-8
    same_distribution = fid(images, torch.rand(64, 3, 16, 16), extractor)
    shifted = fid(images, (images * 0.5 + 0.4).clamp(0, 1), extractor)
    assert shifted > 0 and shifted > 5 * same_distribution


def test_frechet_distance_matches_closed_form():
    # diagonal covariances: FD = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    expected = 5.0 + float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-10)
    # rotation invariance of the non-diagonal case
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    rotated = frechet_distance(q @ mu1.double(), q @ torch.diag(a).double() @ q.T, q @ mu2.double(),
                               q @ torch.diag(b).double() @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(torch.randn(1, 4))


def test_inception_extractor_explains_how_to_get_it(tmp_path):
    with pytest.raises(RuntimeError, match="torch-fidelity|Inception weights not found"):
        inception_extractor(str(tmp_path / "missing.pth"))


def test_patch_statistics_and_flops_to_target():
    stats = patch_statistics(torch.tensor([4, 4, 4, 4, 1, 2, 3, 4, 2, 2], dtype=torch.int32),
                             torch.tensor([0, 4, 10], dtype=torch.int32), 16)
    assert stats["patches_per_image"] == 5 and stats["reduction"] == pytest.approx(3.2)
    assert (stats["patches_min"], stats["patches_max"]) == (4, 6)
    log = [{"step": s, "loss": loss, "cum_flops": 10.0 * s} for s, loss in enumerate([5, 4, 3, 3.5, 2, 1], 1)]
    assert flops_to_target(log, 3.0) == 30.0
    assert flops_to_target(log, 3.0, smoothing=2) == 50.0
    assert flops_to_target(log, 0.5) is None
    assert flops_to_target(log, 3.0, key="val_loss") is None
