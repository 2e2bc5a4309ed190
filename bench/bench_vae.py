"""Benchmark: SD autoencoder encode/decode throughput, memory and tiling error.

    python bench/bench_vae.py                                  # SD architecture, random weights
    python bench/bench_vae.py --vae checkpoints/sd_ae.ckpt --sizes 256,512,1024 --tiles 0,32

For every image size and latent tile size (0 = untiled) it prints one JSON line with
compile time, median wall time and images/s of ``encode`` (posterior mode) and
``decode``, XLA's memory analysis of each compiled function (arguments, outputs and
temporaries: the peak device memory it needs), and, for tiled runs, the max and mean
absolute difference to the untiled result. Run it with the real VAE weights to get the
tiling error bound that applies to them; with random weights the numbers only time the
architecture (random weights exaggerate the per-tile GroupNorm mismatch).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench.timing import timed as _timed  # noqa: E402
from cfm_jax.first_stage import AutoencoderFirstStage, load_autoencoder  # noqa: E402
from cfm_jax.models.autoencoder import AutoencoderKL, abstract_params  # noqa: E402

_VAE = flags.DEFINE_string("vae", "", "VAE checkpoint (file, diffusers folder or converted folder); "
                           "empty: SD architecture with random weights.")
_SIZES = flags.DEFINE_list("sizes", ["256", "512", "1024"], "Square image sizes in pixels.")
_TILES = flags.DEFINE_list("tiles", ["0", "32"], "Latent tile sizes (0: untiled).")
_OVERLAP = flags.DEFINE_integer("overlap", 8, "Latent cells of overlap between tiles.")
_BATCH = flags.DEFINE_integer("batch", 1, "Images per call.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls per function.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_SMALL = flags.DEFINE_bool("small", False, "A tiny autoencoder instead of SD's (for smoke tests).")


def main(argv):
    del argv
    dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
    if _VAE.value:
        model, params, scale = load_autoencoder(_VAE.value, dtype=dtype)
        source = _VAE.value
    else:
        fields = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1) if _SMALL.value else {}
        model = AutoencoderKL(**fields, dtype=dtype)
        shapes = abstract_params(model)
        keys = iter(jax.random.split(jax.random.PRNGKey(0), len(jax.tree.leaves(shapes))))
        params = jax.tree.map(lambda s: 0.05 * jax.random.normal(next(keys), s.shape, s.dtype), shapes)
        scale, source = 0.18215, "random weights (" + ("tiny" if _SMALL.value else "SD architecture") + ")"
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    f = model.downsample_factor
    rng = np.random.default_rng(0)
    for size in map(int, _SIZES.value):
        images = jnp.asarray(rng.uniform(-1, 1, (_BATCH.value, size, size, 3)).astype(np.float32))
        reference = {}
        for tile in map(int, _TILES.value):
            if tile and tile >= size // f:
                continue  # a single tile is the untiled computation
            fs = AutoencoderFirstStage(params=params, model=model, scale_factor=scale, tile_size=tile,
                                       tile_overlap=_OVERLAP.value)
            z, enc_compile, enc_s, enc_mem = _timed(lambda s, x: s.encode(x), fs, images, repeats=_REPEATS.value)
            img, dec_compile, dec_s, dec_mem = _timed(lambda s, z: s.decode(z), fs, z, repeats=_REPEATS.value)
            row = {
                "benchmark": "vae", "source": source, "params": n_params, "dtype": _DTYPE.value,
                "device": jax.devices()[0].device_kind, "image_size": size, "batch": _BATCH.value,
                "tile_latent": tile, "overlap_latent": _OVERLAP.value if tile else 0,
                "encode_compile_s": round(enc_compile, 2), "encode_s": round(enc_s, 4),
                "encode_images_per_s": round(_BATCH.value / enc_s, 3), "encode_memory_bytes": enc_mem,
                "decode_compile_s": round(dec_compile, 2), "decode_s": round(dec_s, 4),
                "decode_images_per_s": round(_BATCH.value / dec_s, 3), "decode_memory_bytes": dec_mem,
            }
            if tile == 0:
                reference = {"z": z, "img": img}
            elif reference:
                # decode the untiled latent with tiles too, so only the decoder's tiling is measured
                img_t = jax.jit(lambda s, z: s.decode(z))(fs, reference["z"])
                row["encode_max_abs_err"] = float(jnp.max(jnp.abs(z - reference["z"])))
                row["encode_mean_abs_err"] = float(jnp.mean(jnp.abs(z - reference["z"])))
                row["decode_max_abs_err"] = float(jnp.max(jnp.abs(img_t - reference["img"])))
                row["decode_mean_abs_err"] = float(jnp.mean(jnp.abs(img_t - reference["img"])))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    app.run(main)
