"""compile_options: which XLA:CPU convolution kernels each program kind gets, and that both
choices compile and compute the same convolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfm_jax import compile_options


@pytest.mark.parametrize("value", [None, "auto", ""])
def test_auto_picks_eigen_for_both_kinds(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(compile_options.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(compile_options.ENV_VAR, value)
    assert compile_options.describe() == {"training": "eigen", "inference": "eigen"}
    eigen = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
    assert compile_options.training("cpu") == eigen and compile_options.inference("cpu") == eigen


@pytest.mark.parametrize("value", ["eigen", "ynnpack", " Eigen "])
def test_environment_overrides_both_kinds(monkeypatch, value):
    monkeypatch.setenv(compile_options.ENV_VAR, value)
    want = value.strip().lower()
    for kind in ("training", "inference"):
        assert compile_options.convolution_kernels(kind) == want
    assert (compile_options.training("cpu") is None) == (want == "ynnpack")
    assert (compile_options.inference("cpu") is None) == (want == "ynnpack")


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(compile_options.ENV_VAR, "onednn")
    with pytest.raises(ValueError, match="CFM_CPU_CONVOLUTIONS='onednn'.*auto"):
        compile_options.training("cpu")
    with pytest.raises(ValueError, match="kind="):
        compile_options.convolution_kernels("decoding")


def test_no_cpu_options_for_other_platforms(monkeypatch):
    monkeypatch.setenv(compile_options.ENV_VAR, "eigen")
    assert compile_options.training("tpu") is None and compile_options.inference("gpu") is None
    assert compile_options.training("cpu") == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def test_both_kernels_compute_the_same_convolution_and_gradients(monkeypatch):
    # Large enough that XLA hands the default program's convolutions to YNNPACK (checked below:
    # on smaller maps both programs would run the same Eigen kernels).
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 64))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 64, 64)) * 0.05

    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.sin(y)), y

    outs, fusions = {}, {}
    for value in ("ynnpack", "eigen"):
        monkeypatch.setenv(compile_options.ENV_VAR, value)
        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                    compiler_options=compile_options.training("cpu")).lower(x, w).compile()
        fusions[value] = f.as_text().count("__ynn_fusion")
        outs[value] = jax.tree.map(np.asarray, f(x, w))
    assert fusions["ynnpack"] > fusions["eigen"], fusions  # the convolutions moved out of YNNPACK
    for a, b in zip(jax.tree.leaves(outs["ynnpack"]), jax.tree.leaves(outs["eigen"])):
        # fp32 parity relative to each output's scale (sums of 576-term products, reordered)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


def test_eigen_moves_convolutions_out_of_ynnpack_and_keeps_reductions(monkeypatch):
    """The compiled program names its YNNPACK fusions: with 'eigen' a convolution has none and
    a large reduction still has one (XLA's own reductions are slow on CPU)."""
    x, w, big = jnp.ones((2, 32, 32, 64)), jnp.ones((3, 3, 64, 64)), jnp.ones((1 << 20,))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def ynn_in(fn, *args, options):
        return "__ynn_fusion" in jax.jit(fn, compiler_options=options).lower(*args).compile().as_text()

    monkeypatch.setenv(compile_options.ENV_VAR, "eigen")
    eigen = compile_options.training("cpu")
    assert not ynn_in(conv, x, w, options=eigen)
    assert ynn_in(lambda b: jnp.sum(b * b), big, options=eigen)
    assert ynn_in(conv, x, w, options=None)  # the default: a YNNPACK convolution
