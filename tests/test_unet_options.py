"""UNet options that are not the original's math (off by default).

model.padding_mode: the 3x3 convolutions pad like PyTorch's `Conv2d(padding=1, padding_mode=...)`
(torch 2.13.0 as the reference), at stride 1 and 2; 'zeros' (the original's) keeps the parameter
tree, so one checkpoint loads into any mode. model.norm='none': no GroupNorm layers, the rest of
the network unchanged."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cfm_jax.models import unet


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv3x3_pads_like_torch(mode, stride):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 4, 10)).astype(np.float32)  # NCHW for torch
    ref = torch.nn.Conv2d(6, 5, 3, stride=stride, padding=1, padding_mode=mode)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    params = {"c": {"kernel": jnp.asarray(ref.weight.detach().numpy().transpose(2, 3, 1, 0)),
                    "bias": jnp.asarray(ref.bias.detach().numpy())}}

    class Wrap(unet.nn.Module):
        @unet.nn.compact
        def __call__(self, h):
            return unet._conv3x3(5, 6, "torch", jnp.float32, jnp.float32, "c", strides=stride, padding_mode=mode)(h)

    got = Wrap().apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_padding_mode_keeps_the_parameters_and_changes_the_border():
    kw = dict(in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1, channel_mult=(1, 2),
              attention_resolutions=(), num_heads=2, dim_head=8)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 16, 16, 3))
    zeros, reflect = unet.EfficientUNet(**kw), unet.EfficientUNet(**kw, padding_mode="reflect")
    params = zeros.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)))
    # make the zero-initialised output layers live, so the output depends on every conv
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    assert jax.tree.structure(reflect.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)))) == jax.tree.structure(params)
    a = np.asarray(zeros.apply(params, x, jnp.full((1,), 0.3)))
    b = np.asarray(reflect.apply(params, x, jnp.full((1,), 0.3)))
    diff = np.abs(a - b)
    assert diff[:, 0].max() > 1e-3 and diff[:, 0].mean() > diff[:, 6:10, 6:10].mean()  # most at the border
    with pytest.raises(ValueError, match="padding_mode='circular'"):
        unet.EfficientUNet(**kw, padding_mode="circular").init(jax.random.PRNGKey(0), x, jnp.zeros((1,)))


def test_norm_none_drops_only_the_group_norms():
    import flax

    kw = dict(in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1, channel_mult=(1, 2),
              attention_resolutions=(2,), num_heads=2, dim_head=8)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 16, 16, 3))
    t = jnp.full((1,), 0.3)
    group = flax.traverse_util.flatten_dict(unet.EfficientUNet(**kw).init(jax.random.PRNGKey(0), x, t)["params"])
    model = unet.EfficientUNet(**kw, norm="none")
    params = model.init(jax.random.PRNGKey(0), x, t)
    none = flax.traverse_util.flatten_dict(params["params"])
    norms = {k for k in group if k[-2] in ("in_layers_0", "out_layers_0", "norm", "out_0")}
    assert norms and set(group) - norms == set(none)  # the same layers otherwise, with the same shapes
    assert all(group[k].shape == none[k].shape for k in none)
    out = np.asarray(model.apply(params, x, t))
    assert out.shape == x.shape and np.isfinite(out).all()
    with pytest.raises(ValueError, match="model.norm='layer'"):
        unet.EfficientUNet(**kw, norm="layer").init(jax.random.PRNGKey(0), x, t)
