"""FID: our Flax FID Inception-v3 against a PyTorch restatement of pytorch-fid's network
(same random weights, through the converter), the input resize against `F.interpolate`,
the Fréchet distance against closed forms, pytorch-fid's `.npz` statistics files, the
patch-FID crops of fm-boosting, and the converter's errors.

pytorch-fid itself cannot be imported beside torch 2.13 here: its `inception.py`
imports torchvision at module level and subclasses torchvision's Inception blocks,
and torchvision is not installed (no build matching torch 2.13). `TorchFIDInception`
below restates the published architecture in plain PyTorch instead: torchvision's
`Inception3` stem and blocks (`BasicConv2d` = bias-free conv, BatchNorm eps 0.001,
ReLU) with pytorch-fid's patches (A/C/E_1 average pools with
`count_include_pad=False`, a max pool in E_2's pool branch), its input handling
(`F.interpolate(299, bilinear, align_corners=False)`, then `2x - 1`) and its block-3
output (adaptive average pool after Mixed_7c), with the state-dict names of
`pt_inception-2015-12-05-6726825d.pth` (including the ignored `fc`).
"""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfm_jax import fid
from cfm_jax.convert.inception import inception_variables_from_torch, load_fid_inception, save_converted
from cfm_jax.models.inception import FIDInceptionV3, abstract_variables
from tests.torch_layouts import inception_variables_to_torch

# fp32 parity: XLA and ATen sum the ~94 convolutions in different orders.
FEATURE_RTOL = 1e-4


# ----------------------------------------------------------------------------------
# PyTorch restatement of pytorch-fid's FID Inception-v3
# ----------------------------------------------------------------------------------


class TorchBasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class TorchInceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = TorchBasicConv2d(cin, 64, 1)
        self.branch5x5_1 = TorchBasicConv2d(cin, 48, 1)
        self.branch5x5_2 = TorchBasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = TorchBasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = TorchBasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = TorchBasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_tf_avg_pool(x))], 1)


class TorchInceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = TorchBasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = TorchBasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = TorchBasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TorchInceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = TorchBasicConv2d(cin, 192, 1)
        self.branch7x7_1 = TorchBasicConv2d(cin, c7, 1)
        self.branch7x7_2 = TorchBasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = TorchBasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = TorchBasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = TorchBasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = TorchBasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = TorchBasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = TorchBasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = TorchBasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class TorchInceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = TorchBasicConv2d(cin, 192, 1)
        self.branch3x3_2 = TorchBasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = TorchBasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = TorchBasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = TorchBasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = TorchBasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TorchInceptionE(nn.Module):
    """`max_pool=False`: FIDInceptionE_1 (Mixed_7b); True: FIDInceptionE_2 (Mixed_7c)."""

    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = TorchBasicConv2d(cin, 320, 1)
        self.branch3x3_1 = TorchBasicConv2d(cin, 384, 1)
        self.branch3x3_2a = TorchBasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = TorchBasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = TorchBasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = TorchBasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = TorchBasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = TorchBasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
    """pytorch-fid `InceptionV3()` (block 3, resize and normalisation on): [B, 3, H, W] in [0, 1] -> [B, 2048]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TorchBasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = TorchBasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = TorchBasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = TorchBasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = TorchBasicConv2d(80, 192, 3)
        self.Mixed_5b = TorchInceptionA(192, 32)
        self.Mixed_5c = TorchInceptionA(256, 64)
        self.Mixed_5d = TorchInceptionA(288, 64)
        self.Mixed_6a = TorchInceptionB(288)
        self.Mixed_6b = TorchInceptionC(768, 128)
        self.Mixed_6c = TorchInceptionC(768, 160)
        self.Mixed_6d = TorchInceptionC(768, 160)
        self.Mixed_6e = TorchInceptionC(768, 192)
        self.Mixed_7a = TorchInceptionD(768)
        self.Mixed_7b = TorchInceptionE(1280, max_pool=False)
        self.Mixed_7c = TorchInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # in the weights file; not used for FID

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def _randomize(model, seed=0):
    """Every weight and BatchNorm statistic redrawn: He-scaled convs, BN scale 1 + 0.2 N,
    bias 0.1 N, running mean 0.1 N, running var U(0.5, 1.5) (activations stay O(1))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * np.sqrt(2.0 / fan_in))
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(0.01 * torch.randn(m.weight.shape, generator=gen))
                m.bias.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def torch_inception():
    torch.set_num_threads(2)
    model = _randomize(TorchFIDInception())
    state_dict = model.state_dict()
    return model, state_dict


@pytest.fixture(scope="module")
def converted(torch_inception):
    return inception_variables_from_torch(torch_inception[1])


# ----------------------------------------------------------------------------------
# Network parity
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def features_and_reference(torch_inception, converted):
    """Our fp32 features (through `InceptionFeatures`) and the restatement's, for 3 images."""
    torch_model, _ = torch_inception
    # N=3 in batches of 2: exercises the padded last batch; non-square, up-sampled input.
    x01 = np.random.default_rng(0).uniform(0.0, 1.0, (3, 72, 88, 3)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(np.transpose(x01, (0, 3, 1, 2)))).numpy()
    feats = fid.InceptionFeatures(FIDInceptionV3(), jax.tree.map(jnp.asarray, converted), batch_size=2,
                                  value_range=(-1.0, 1.0))
    ours = feats(x01 * 2.0 - 1.0)  # our [-1, 1] convention in, pytorch-fid's [0, 1] inside
    return x01, ours, ref


def test_features_match_pytorch_restatement(torch_inception, features_and_reference):
    _, state_dict = torch_inception
    assert "fc.weight" in state_dict and "Mixed_7c.branch_pool.bn.num_batches_tracked" in state_dict
    _, ours, ref = features_and_reference
    assert ref.shape == (3, 2048) and np.abs(ref).max() > 0.1 and (ref > 0).mean() > 0.2  # not degenerate
    assert ours.shape == (3, 2048) and ours.dtype == np.float32
    err = np.abs(ours.astype(np.float64) - ref)
    rel = err.max() / np.abs(ref).max()
    print(f"pool3 features: max abs err {err.max():.2e}, relative to max|ref| {rel:.2e} "
          f"(max|ref| {np.abs(ref).max():.3f})")
    assert rel < FEATURE_RTOL
    np.testing.assert_allclose(ours, ref, rtol=FEATURE_RTOL, atol=FEATURE_RTOL * np.abs(ref).max())


def test_bfloat16_compute_stays_close(converted, features_and_reference):
    x01, ours, _ = features_and_reference
    model = FIDInceptionV3(dtype=jnp.bfloat16)
    bf16 = np.asarray(jax.jit(model.apply)(jax.tree.map(jnp.asarray, converted), jnp.asarray(x01)))
    assert bf16.dtype == np.float32
    rel = np.abs(bf16 - ours).max() / np.abs(ours).max()
    print(f"bf16 compute vs fp32: max error relative to max|fp32| {rel:.2e}")
    assert rel < 3e-2


# ----------------------------------------------------------------------------------
# Converter and files
# ----------------------------------------------------------------------------------


def test_converter_layout_and_inverse(torch_inception, converted):
    _, state_dict = torch_inception
    assert set(converted) == {"params", "batch_stats"}
    kernel = converted["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    np.testing.assert_array_equal(kernel, state_dict["Mixed_6b.branch7x7_2.conv.weight"].numpy().transpose(2, 3, 1, 0))
    assert kernel.shape == (1, 7, 128, 128)
    np.testing.assert_array_equal(converted["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"],
                                  state_dict["Conv2d_1a_3x3.bn.running_var"].numpy())
    shapes = jax.tree.map(lambda a: a.shape, abstract_variables(FIDInceptionV3()))
    assert jax.tree.map(np.shape, converted) == shapes
    assert sum(a.size for a in jax.tree.leaves(converted["params"])) == 21_785_568  # Inception-v3 less fc

    back = inception_variables_to_torch(converted)
    kept = {k for k in state_dict if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(back) == kept
    for k in kept:
        np.testing.assert_array_equal(back[k], state_dict[k].numpy())


def test_converter_accepts_pytorch_fid_wrapper_names(converted):
    sd = inception_variables_to_torch(converted)
    # pytorch-fid's InceptionV3.blocks: 0 = stem to maxpool1, 1 = to maxpool2, 2 = Mixed_5b..6e, 3 = Mixed_7a..7c.
    table = {"Conv2d_1a_3x3": "blocks.0.0", "Conv2d_2a_3x3": "blocks.0.1", "Conv2d_2b_3x3": "blocks.0.2",
             "Conv2d_3b_1x1": "blocks.1.0", "Conv2d_4a_3x3": "blocks.1.1",
             "Mixed_5b": "blocks.2.0", "Mixed_5c": "blocks.2.1", "Mixed_5d": "blocks.2.2", "Mixed_6a": "blocks.2.3",
             "Mixed_6b": "blocks.2.4", "Mixed_6c": "blocks.2.5", "Mixed_6d": "blocks.2.6", "Mixed_6e": "blocks.2.7",
             "Mixed_7a": "blocks.3.0", "Mixed_7b": "blocks.3.1", "Mixed_7c": "blocks.3.2"}
    wrapped = {table[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in sd.items()}
    back = inception_variables_from_torch(wrapped)
    jax.tree.map(np.testing.assert_array_equal, back, converted)


def test_converter_error_names_every_bad_key(converted):
    sd = inception_variables_to_torch(converted)
    del sd["Mixed_6b.branch7x7_2.conv.weight"]
    sd["Conv2d_1a_3x3.bn.running_var"] = np.ones(31, np.float32)
    sd["Mixed_6b.extra.weight"] = np.zeros(3, np.float32)
    sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    sd["fc.weight"] = np.zeros((1008, 2048), np.float32)  # ignored, not an error
    with pytest.raises(ValueError) as info:
        inception_variables_from_torch(sd)
    msg = str(info.value)
    print(msg)
    assert "(1 missing, 2 unexpected, 1 wrong shape)" in msg
    assert "missing: Mixed_6b.branch7x7_2.conv.weight" in msg and "(128, 128, 1, 7)" in msg
    assert "unexpected: Mixed_6b.extra.weight" in msg and "unexpected: AuxLogits.fc.weight" in msg
    assert "wrong shape: Conv2d_1a_3x3.bn.running_var: got (31,), expected (32,)" in msg
    assert "torchvision's ImageNet Inception-v3" in msg and " fc.weight" not in msg

    with pytest.raises(ValueError, match=r"no FID Inception-v3 weights.*top-level key names are: model, optimizer"):
        inception_variables_from_torch({"model.Conv2d_1a_3x3.conv.weight": np.zeros(3), "optimizer.x": np.zeros(1)})


def test_load_pth_and_converted_folder(torch_inception, converted, tmp_path):
    _, state_dict = torch_inception
    pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state_dict, pth)
    model, variables = load_fid_inception(pth)
    assert isinstance(model, FIDInceptionV3) and model.dtype == jnp.float32
    jax.tree.map(np.testing.assert_array_equal, variables, converted)

    out = tmp_path / "fid_inception_flax"
    save_converted(out, variables, source=str(pth))
    assert (out / "config.json").is_file()
    model2, restored = load_fid_inception(out, dtype=jnp.bfloat16)
    assert model2.dtype == jnp.bfloat16
    jax.tree.map(np.testing.assert_array_equal, restored, converted)

    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_fid_inception(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="not a converted FID Inception"):
        load_fid_inception(tmp_path)


# ----------------------------------------------------------------------------------
# Input conventions
# ----------------------------------------------------------------------------------


def test_to_unit_range_conventions():
    x = np.linspace(-1.2, 1.2, 97, dtype=np.float32).reshape(1, 97, 1, 1).repeat(3, axis=-1)
    unit = np.asarray(fid.to_unit_range(x))
    np.testing.assert_allclose(unit, np.clip(x / 2 + 0.5, 0, 1), atol=1e-7)
    np.testing.assert_allclose(np.asarray(fid.to_unit_range(x / 2 + 0.5, value_range=(0, 1))), unit, atol=1e-7)
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    np.testing.assert_allclose(np.asarray(fid.to_unit_range(u8)), u8 / 255.0, atol=1e-7)
    # 'floor' is fm-boosting's un_normalize_ims: ((x * 127.5) + 127.5).clip(0, 255).to(torch.uint8).
    orig = ((torch.from_numpy(x) * 127.5) + 127.5).clip(0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(np.round(np.asarray(fid.to_unit_range(x, quantize="floor")) * 255), orig)
    levels = np.clip(x * np.float32(127.5) + np.float32(127.5), 0, 255)
    np.testing.assert_array_equal(np.round(np.asarray(fid.to_unit_range(x, quantize="round")) * 255),
                                  np.round(levels))
    with pytest.raises(ValueError, match="quantize"):
        fid.to_unit_range(x, quantize="nearest")


# ----------------------------------------------------------------------------------
# Statistics and the Fréchet distance
# ----------------------------------------------------------------------------------


def test_statistics_match_pytorch_fid_recipe():
    f = np.random.default_rng(2).standard_normal((50, 16)).astype(np.float32)
    mu, sigma = fid.statistics(f)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, np.mean(f.astype(np.float64), axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        fid.statistics(f[:1])


def test_fid_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(3).standard_normal((600, 256)) @ np.random.default_rng(4).standard_normal((256, 256))
    mu, sigma = fid.statistics(f)
    value = fid.frechet_distance(mu, sigma, mu, sigma)
    print(f"self-FID {value:.3e} (trace of sigma {np.trace(sigma):.1f})")
    assert abs(value) < 1e-8 * np.trace(sigma)


def test_fid_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(5)
    d = 64
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    value = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    print(f"diagonal Gaussians: FID {value:.12f}, closed form {expected:.12f}")
    assert value == pytest.approx(expected, rel=1e-10)


def test_fid_of_full_covariances_matches_eigendecomposition():
    rng = np.random.default_rng(6)
    d = 48
    m1, m2 = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = m1 @ m1.T / d + 0.1 * np.eye(d), m2 @ m2.T / d + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)

    def sqrt_psd(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = sqrt_psd(s1)  # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD root
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrt_psd(r1 @ s2 @ r1))
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_sqrtm_guards(monkeypatch):
    """pytorch-fid's guards: a non-finite root is retried with eps*I added to both
    covariances; a large imaginary part is an error; a tiny one is dropped."""
    d = 4
    s1, s2 = np.diag([1.0, 2.0, 3.0, 4.0]), np.diag([4.0, 3.0, 2.0, 1.0])
    mu = np.zeros(d)
    real_sqrtm, calls = fid.linalg.sqrtm, []

    def nan_then_real(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid.linalg, "sqrtm", nan_then_real)
    with pytest.warns(RuntimeWarning, match="adding 1e-06"):
        value = fid.frechet_distance(mu, s1, mu, s2)
    off = np.eye(d) * 1e-6
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off))
    assert value == pytest.approx(np.sum((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2), abs=1e-5)

    monkeypatch.setattr(fid.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-6j)
    assert np.isfinite(fid.frechet_distance(mu, s1, mu, s2))
    monkeypatch.setattr(fid.linalg, "sqrtm", lambda a: real_sqrtm(a) + 0.1j * np.eye(d))
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(mu, s1, mu, s2)


def test_stats_npz_round_trip_in_pytorch_fid_format(tmp_path):
    rng = np.random.default_rng(7)
    mu, sigma = fid.statistics(rng.standard_normal((40, 8)))
    fid.save_stats(tmp_path / "ref_stats", mu, sigma)  # numpy adds .npz, as in pytorch-fid
    path = tmp_path / "ref_stats.npz"
    # pytorch-fid's reader (fid_score.compute_statistics_of_path for a .npz path):
    with np.load(path) as f:
        m, s = f["mu"][:], f["sigma"][:]
    np.testing.assert_array_equal(m, mu)
    np.testing.assert_array_equal(s, sigma)
    # pytorch-fid's writer (fid_score.save_fid_stats), read back by us.
    np.savez_compressed(tmp_path / "theirs.npz", mu=mu[::-1], sigma=sigma.T)
    m2, s2 = fid.load_stats(tmp_path / "theirs.npz")
    np.testing.assert_array_equal(m2, mu[::-1])
    np.testing.assert_array_equal(s2, sigma.T)
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(ValueError, match="no sigma"):
        fid.load_stats(tmp_path / "bad.npz")


@pytest.mark.parametrize("n1,n2,d", [(12, 20, 64), (30, 9, 48), (5, 5, 256)])
def test_low_rank_fid_equals_pytorch_fid_formula(n1, n2, d):
    """Fewer samples than dimensions: the trace term as the nuclear norm of A^T B equals
    tr sqrtm(sigma1 sigma2) (same distance, without the D x D square root)."""
    rng = np.random.default_rng(n1 + n2 + d)
    f1 = rng.standard_normal((n1, d)) * rng.uniform(0.5, 2.0, d)
    f2 = 0.3 + rng.standard_normal((n2, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
    mu1, s1 = fid.statistics(f1)
    mu2, s2 = fid.statistics(f2)
    w, v = np.linalg.eigh(s1)  # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), symmetric PSD
    s1h = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(s1h @ s2 @ s1h)
    reference = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(ev, 0, None)))
    fast = fid.low_rank_frechet_distance(f1, f2)
    # the eigh reference takes square roots of the rounding noise in the D - N null directions
    # (each up to ~sqrt(1e-16 * scale)); the SVD of A^T B does not, hence 1e-7, not 1e-12
    assert fast == pytest.approx(reference, rel=1e-7)
    # pytorch-fid's sqrtm of the singular product agrees to its own (ill-conditioned) accuracy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert fid.frechet_distance(*fid.statistics(f1), *fid.statistics(f2)) == pytest.approx(fast, rel=1e-4)
    assert fid.features_fid(f1, f2) == fast  # small sets take the low-rank path
    assert fid.low_rank_frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid.low_rank_frechet_distance(f1[:1], f2)


def test_stats_file_can_carry_the_features(tmp_path):
    feats = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    fid.save_stats(tmp_path / "s.npz", *fid.statistics(feats), features=feats)
    np.testing.assert_array_equal(fid.load_features(tmp_path / "s.npz"), feats)
    with np.load(tmp_path / "s.npz") as f:  # pytorch-fid reads only mu and sigma
        assert {"mu", "sigma"} <= set(f.files)
    fid.save_stats(tmp_path / "t.npz", *fid.statistics(feats))
    assert fid.load_features(tmp_path / "t.npz") is None


# ----------------------------------------------------------------------------------
# Patch-FID crops
# ----------------------------------------------------------------------------------


def test_patch_crops_count_shape_and_determinism():
    """The evaluator's patch-FID crops: ``crop_anchors`` then ``take_crops`` of the real and the
    generated image at the same anchors."""
    rng = np.random.default_rng(8)
    real = jnp.asarray(rng.uniform(-1, 1, (3, 40, 56, 3)).astype(np.float32))
    gen = jnp.asarray(rng.uniform(-1, 1, (3, 40, 56, 3)).astype(np.float32))
    anchors = np.asarray(fid.crop_anchors(0, 3, 4, (40, 56), 16))
    assert anchors.shape == (3, 4, 2)
    np.testing.assert_array_equal(anchors, fid.crop_anchors(jax.random.PRNGKey(0), 3, 4, (40, 56), 16))
    assert not np.array_equal(anchors, fid.crop_anchors(1, 3, 4, (40, 56), 16))
    crops = fid.take_crops(real, anchors, 16)
    assert crops.shape == (12, 16, 16, 3)
    for i in range(3):
        for k in range(4):
            r, c = anchors[i, k]
            np.testing.assert_array_equal(crops[i * 4 + k], real[i, r:r + 16, c:c + 16])  # image-major order
    # the same anchors in the real and the generated image: crops of the difference are the difference
    np.testing.assert_allclose(fid.take_crops(real, anchors, 16) - fid.take_crops(gen, anchors, 16),
                               fid.take_crops(real - gen, anchors, 16))

    many = np.asarray(fid.crop_anchors(3, 100, 50, (40, 56), 16))  # every valid corner, none outside
    assert many[..., 0].min() == 0 and many[..., 0].max() == 40 - 16
    assert many[..., 1].min() == 0 and many[..., 1].max() == 56 - 16

    whole = fid.crop_anchors(0, 3, 1, (40, 40), 40)
    np.testing.assert_array_equal(fid.take_crops(real[:, :, :40], whole, 40), real[:, :, :40])
    with pytest.raises(ValueError, match="does not fit"):
        fid.crop_anchors(0, 3, 1, (40, 56), 41)


def test_convert_cli_writes_a_loadable_folder(torch_inception, converted, tmp_path):
    import subprocess
    import sys
    pth, out = tmp_path / "pt_inception.pth", tmp_path / "fid_inception"
    torch.save(torch_inception[1], pth)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "cfm_jax.convert", "inception", "--src", str(pth), "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "21,785,568 parameters" in proc.stdout
    _, variables = load_fid_inception(out)
    jax.tree.map(np.testing.assert_array_equal, variables, converted)
