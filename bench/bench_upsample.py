"""Benchmark: seconds per 1024² image of the paper configuration, split into CFM and decode.

    python bench/bench_upsample.py                          # paper config, batch 1 and 4, 40 NFE Euler
    python bench/bench_upsample.py --batches 1 --num_steps 3 --small   # smoke test (tiny UNet and VAE, 64²)

The input is what SD1.5 at 512² hands over: a 64² x 4 latent. The timed pieces, each jitted,
compiled ahead of time (compile time reported apart) and timed as the median of
``--repeats`` calls after a warm-up:

* ``psu``: the coupling's source, pixel-space up-sampling (decode the 64² latent to 512²
  pixels, bilinear to 1024², encode to the 128² latent) plus the forward noising of step 400;
* ``flow``: the ODE from that source to the high-res latent, ``--method`` on ``--num_steps``
  grid points (the original's convention: 41 points = 40 Euler steps = 40 NFE, the paper's
  tables; the original's default 40 points gives 39);
* ``decode``: the SD VAE decoder from the 128² latent to the 1024² image.

``cfm = psu + flow`` is what the paper's "CFM" adds to a base model; ``total = cfm + decode``.
Weights are random (timing does not depend on them): the paper's UNet (305.8 M parameters,
bf16 compute as the paper config) and the SD VAE architecture (``--vae_dtype``). One JSON line
per batch size: seconds per call and per image of each piece, NFE, compile seconds, device.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench.timing import timed  # noqa: E402
from cfm_jax.first_stage import SD_SCALE_FACTOR, AutoencoderFirstStage  # noqa: E402
from cfm_jax.model import CFMUpsampler  # noqa: E402
from cfm_jax.models.autoencoder import AutoencoderKL, abstract_params  # noqa: E402
from cfm_jax.solvers import SolverSpec  # noqa: E402
from configs import load_config  # noqa: E402

_BATCHES = flags.DEFINE_list("batches", ["1", "4"], "Batch sizes.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 41, "Grid points of the solver (41 = 40 Euler steps).")
_METHOD = flags.DEFINE_string("method", "euler", "ODE method (cfm_jax.solvers).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per piece.")
_LOWRES_LATENT = flags.DEFINE_integer("lowres_latent", 0, "Input latent side (0: the config's data.lowres_size / 8, "
                                      "i.e. 64, SD1.5 at 512²).")
_VAE_DTYPE = flags.DEFINE_enum("vae_dtype", "float32", ["float32", "bfloat16"], "Autoencoder compute dtype.")
_SMALL = flags.DEFINE_bool("small", False, "Tiny UNet and autoencoder, 32² -> 64² images (smoke test of the script).")


def build(small: bool, vae_dtype: str):
    """``(upsampler, unet params, lowres_factor)`` of the paper config with random weights."""
    config = load_config()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[vae_dtype]
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, dtype=dtype) if small else AutoencoderKL(
        dtype=dtype)
    rng = np.random.default_rng(0)
    vae_params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.02, jnp.float32),
                              abstract_params(vae))
    fs = AutoencoderFirstStage(params=vae_params, model=vae, scale_factor=SD_SCALE_FACTOR)
    if small:
        config.model.update(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                            num_heads=1, dim_head=32)
        config.data.update(image_size=64, lowres_size=32)
    ups = CFMUpsampler(config, first_stage=fs)
    size = config.data.image_size // fs.downsample_factor
    params = jax.jit(lambda k: ups.init(k, size))(jax.random.PRNGKey(0))
    return ups, params, config


def measure(ups, params, config, batch: int, *, solver, repeats: int, lowres_side: int = 0,
            vae_dtype: str = "float32", small: bool = False) -> dict:
    """One JSON row: PSU, flow and decode of ``batch`` random low-res latents, each compiled
    ahead of time and timed (median of ``repeats`` after a warm-up); see the module docstring."""
    fs = ups.first_stage
    out_latent = config.data.image_size // fs.downsample_factor
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))

    def psu(fs, lowres, keys):  # CFMUpsampler.sample is source, then integrate
        return ups.source(lowres, keys, size=out_latent, first_stage=fs)

    def flow(params, x0, context, keys):
        r = ups.integrate(params, x0, context, keys, solver=solver)
        return r.x, r.nfe

    def decode(fs, x):
        return jnp.clip(fs.decode(x), -1.0, 1.0)

    side = lowres_side or config.data.lowres_size // fs.downsample_factor
    b = batch
    lowres = jax.random.normal(jax.random.PRNGKey(1), (b, side, side, fs.latent_channels))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(2), i))(jnp.arange(b))
    (x0, ctx), c_psu, t_psu, _ = timed(psu, fs, lowres, keys, repeats=repeats)
    (x1, nfe), c_flow, t_flow, _ = timed(flow, params, x0, ctx, keys, repeats=repeats)
    img, c_dec, t_dec, _ = timed(decode, fs, x1, repeats=repeats)
    cfm = t_psu + t_flow
    return {
        "bench": "upsample", "batch": b, "input_latent": list(lowres.shape[1:]), "output_image": list(img.shape[1:]),
        "method": solver.method, "num_steps": solver.num_steps, "nfe": int(nfe), "unet_params": n_params,
        "unet_dtype": config.model.dtype, "vae_dtype": vae_dtype, "small": small,
        "seconds_per_call": {"psu": t_psu, "flow": t_flow, "cfm": cfm, "decode": t_dec, "total": cfm + t_dec},
        "seconds_per_image": {"psu": t_psu / b, "flow": t_flow / b, "cfm": cfm / b, "decode": t_dec / b,
                              "total": (cfm + t_dec) / b},
        "flow_seconds_per_nfe": t_flow / max(int(nfe), 1),
        "compile_seconds": {"psu": c_psu, "flow": c_flow, "decode": c_dec},
        "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def main(argv):
    del argv
    ups, params, config = build(_SMALL.value, _VAE_DTYPE.value)
    solver = SolverSpec(method=_METHOD.value, num_steps=_NUM_STEPS.value)
    for b in (int(v) for v in _BATCHES.value):
        print(json.dumps(measure(ups, params, config, b, solver=solver, repeats=_REPEATS.value,
                                 lowres_side=_LOWRES_LATENT.value, vae_dtype=_VAE_DTYPE.value,
                                 small=_SMALL.value)), flush=True)


if __name__ == "__main__":
    app.run(main)
