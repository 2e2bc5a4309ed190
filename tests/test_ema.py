"""EMA with the ema-pytorch semantics the original uses.

Expected values come from running the original's own code, not from a restatement of our
notes (a restatement once repeated our one-update-behind error): CompVis/fm-boosting at
commit 8f38bd3, ``fmboost/ema.py``, torch 2.13.0 CPU, in a throwaway venv outside this
repository. The script that produced them:

    net = torch.nn.Linear(1, 1, bias=False).double()
    ema = EMA(net, beta=0.9, power=0.75, inv_gamma=1.0, update_every=UE,
              update_after_step=AFTER, include_online_model=False)
    for k in range(40):
        net.weight.fill_(math.cos(0.7 * k) + 0.05 * k); ema.update()
        record(ema.ema_model.weight.item())

and, for the decays, ``ema.step.fill_(s + 1); ema.get_current_decay()`` (the counter after
``update()`` has incremented it) with beta=0.999, power=0.75, update_after_step=1000 (or 5).
"""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from cfm_jax.ema import EMAConfig, ema_decay, ema_update

# EMA weight after each of 40 updates, online weight cos(0.7 k) + 0.05 k at update k
# (CompVis/fm-boosting@8f38bd3 fmboost/ema.py, float64).
ORIGINAL_EMA = {
    (1, 5): [
        1.0, 0.8148421872844885, 0.26996714290024104, -0.3548461045998571,
        -0.7422223406686581, -0.6864566872907963, -0.19026082134070016, 0.12856831094689272,
        0.498737875769605, 0.7831893354983173, 0.9059735997328485, 0.8588958812719003,
        0.6953027439061924, 0.5041951031077853, 0.37355888677434523, 0.3571525829778499,
        0.45732480291666205, 0.6294967840846069, 0.8049601589496673, 0.9214374563585908,
        0.9483499265897462, 0.8967580877523932, 0.8109675325989489, 0.7466743189217048,
        0.7458968435639214, 0.8196533025430087, 0.9473232497567803, 1.0874637549175445,
        1.191856013879388, 1.2296766130128236, 1.201936019075243, 1.1409509220375704,
        1.0950980138484447, 1.1060192150229833, 1.1889986153995629, 1.3257397358524479,
        1.472939695501513, 1.582627375684949, 1.6246999148577241, 1.6010579901471642,
    ],
    (3, 4): [
        1.0, 1.0, 1.0, -0.3548461045998571,
        -0.3548461045998571, -0.3548461045998571, -0.19026082134070016, -0.19026082134070016,
        -0.19026082134070016, 0.23756015575831912, 0.23756015575831912, 0.23756015575831912,
        0.20737458564932232, 0.20737458564932232, 0.20737458564932232, 0.21778006505977443,
        0.21778006505977443, 0.21778006505977443, 0.4384119614697568, 0.4384119614697568,
        0.4384119614697568, 0.44733803640077957, 0.44733803640077957, 0.44733803640077957,
        0.4771022056998611, 0.4771022056998611, 0.4771022056998611, 0.6642648264772606,
        0.6642648264772606, 0.6642648264772606, 0.6930654246737038, 0.6930654246737038,
        0.6930654246737038, 0.7441898943509203, 0.7441898943509203, 0.7441898943509203,
        0.9495448520153669, 0.9495448520153669, 0.9495448520153669, 0.9934184496859938,
    ],
    (1, 0): [
        1.0, 0.8148421872844885, 0.5758102034220319, 0.24677348813937872,
        -0.04900525922862296, -0.21528283829298744, -0.20946851946510073, -0.05264536444435059,
        0.1837240196294567, 0.40887814838547504, 0.548780345363584, 0.5727579269450066,
        0.5008877605899535, 0.39054637707842565, 0.30907520000689015, 0.3047486840065298,
        0.3881509958787524, 0.5309522738294057, 0.6813266981200546, 0.7882716277406466,
        0.8237934747888732, 0.7930556813226148, 0.7284548060995901, 0.6781960334996957,
        0.6843085728659322, 0.7628217306194759, 0.896174836380571, 1.0414301840984295,
        1.1504258012397104, 1.192389422624887, 1.168377548615096, 1.1107482994235345,
        1.067915654215899, 1.08155509200177, 1.1669809052637412, 1.3059237972551516,
        1.4551053512363952, 1.5665764662715467, 1.6102540967683456, 1.5880567542111388,
    ],
}
# get_current_decay() of the original (float32), keyed by the counter before update().
ORIGINAL_DECAY_AFTER_1000 = {1001: 0.4053964614868164, 1002: 0.5613086223602295, 1101: 0.968843400478363,
                             10_000_000: 0.9990000128746033}
ORIGINAL_DECAY_AFTER_5_AT_7 = 0.5613086223602295  # the example: 1 - 3^(-3/4)


@pytest.mark.parametrize("update_every,after", sorted(ORIGINAL_EMA))
def test_ema_sequence_matches_original(update_every, after):
    cfg = EMAConfig(beta=0.9, power=0.75, inv_gamma=1.0, update_every=update_every, update_after_step=after)
    online = [math.cos(0.7 * k) + 0.05 * k for k in range(40)]
    ema = jnp.asarray(0.0, jnp.float32)  # overwritten by the first (copy) update
    got = []
    for step, value in enumerate(online):
        ema = ema_update({"w": ema}, {"w": jnp.asarray(value, jnp.float32)}, step, cfg)["w"]
        got.append(float(ema))
    np.testing.assert_allclose(got, ORIGINAL_EMA[(update_every, after)], rtol=3e-6, atol=3e-6)


def test_decay_matches_original():
    cfg = EMAConfig(beta=0.999, power=0.75, update_after_step=1000)
    for step, expected in ORIGINAL_DECAY_AFTER_1000.items():
        np.testing.assert_allclose(float(ema_decay(step, cfg)), expected, rtol=1e-6)
    cfg5 = EMAConfig(beta=0.999, power=0.75, update_after_step=5)
    np.testing.assert_allclose(float(ema_decay(7, cfg5)), ORIGINAL_DECAY_AFTER_5_AT_7, rtol=1e-6)
    np.testing.assert_allclose(ORIGINAL_DECAY_AFTER_5_AT_7, 1 - 3 ** -0.75, rtol=1e-6)


def test_warmup_copies_exactly_and_keeps_dtype():
    cfg = EMAConfig(update_after_step=10)
    online = {"a": jnp.array([1.2345678, -3.0], jnp.float32), "b": jnp.array([2.0], jnp.bfloat16)}
    ema = {"a": jnp.zeros(2, jnp.float32), "b": jnp.zeros(1, jnp.bfloat16)}
    out = ema_update(ema, online, 3, cfg)
    np.testing.assert_array_equal(out["a"], online["a"])
    assert out["b"].dtype == jnp.bfloat16
