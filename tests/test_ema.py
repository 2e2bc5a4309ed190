"""EMA with the ema-pytorch semantics the original uses."""
import jax.numpy as jnp
import numpy as np
import pytest

from cfm_jax.ema import EMAConfig, ema_decay, ema_update


def reference_ema(online_values, *, beta, power, inv_gamma, update_every, update_after_step):
    """A plain-Python restatement of ema-pytorch's EMA.update (float64)."""
    ema, step, initted, out = online_values[0], 0, False, []
    for online in online_values:
        s = step
        step += 1
        if s % update_every == 0:
            if s <= update_after_step:
                ema = online
            else:
                if not initted:
                    ema, initted = online, True
                epoch = max(s - update_after_step - 1, 0)
                decay = 0.0 if epoch <= 0 else min(max(1 - (1 + epoch / inv_gamma) ** -power, 0.0), beta)
                ema = ema + (1 - decay) * (online - ema)
        out.append(ema)
    return np.array(out)


@pytest.mark.parametrize("update_every,after", [(1, 5), (3, 4), (1, 0)])
def test_ema_sequence_matches_reference(update_every, after):
    cfg = EMAConfig(beta=0.9, power=0.75, inv_gamma=1.0, update_every=update_every, update_after_step=after)
    rng = np.random.default_rng(0)
    online = rng.normal(size=60).cumsum()
    expected = reference_ema(online, beta=0.9, power=0.75, inv_gamma=1.0, update_every=update_every,
                             update_after_step=after)
    ema = jnp.asarray(online[0], jnp.float32)
    got = []
    for step, value in enumerate(online):
        ema = ema_update({"w": ema}, {"w": jnp.asarray(value, jnp.float32)}, step, cfg)["w"]
        got.append(float(ema))
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)


def test_decay_formula_values():
    cfg = EMAConfig(beta=0.999, power=0.75, update_after_step=1000)
    assert float(ema_decay(1001, cfg)) == 0.0  # e = 0
    np.testing.assert_allclose(float(ema_decay(1002, cfg)), 1 - 2 ** -0.75, rtol=1e-6)
    np.testing.assert_allclose(float(ema_decay(1101, cfg)), 1 - 101 ** -0.75, rtol=1e-6)
    assert float(ema_decay(10_000_000, cfg)) == pytest.approx(0.999)  # clamped at beta


def test_warmup_copies_exactly_and_keeps_dtype():
    cfg = EMAConfig(update_after_step=10)
    online = {"a": jnp.array([1.2345678, -3.0], jnp.float32), "b": jnp.array([2.0], jnp.bfloat16)}
    ema = {"a": jnp.zeros(2, jnp.float32), "b": jnp.zeros(1, jnp.bfloat16)}
    out = ema_update(ema, online, 3, cfg)
    np.testing.assert_array_equal(out["a"], online["a"])
    assert out["b"].dtype == jnp.bfloat16
