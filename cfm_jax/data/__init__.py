"""Data sources for cfm-jax.

Every source yields batches as dicts of NHWC float32 arrays in [-1, 1]:

* ``image``          [B, H, H, 3]  high-res image,
* ``latent``         [B, H, H, C]  its first-stage latent (identity stage: == ``image``),
* ``latent_lowres``  [B, H, H, C]  PSU latent of the low-res image, already on the
                                    high-res grid (identity stage: bilinear up-sampling
                                    of ``image_lowres`` back to H x H),
* ``image_lowres``   [B, h, h, 3]  antialiased down-sampled image, h = H // factor.

Modules (imported explicitly, this package imports nothing heavy on its own):

* :mod:`cfm_jax.data.photos` -- deterministic random crops of the real photos that
  ship with scikit-image (quick start / tests), plus the resampling helpers
  ``downsample``, ``upsample_bilinear``, ``upsample_bicubic``.
* :mod:`cfm_jax.data.eval_data` -- evaluation sets read batch by batch (records, image
  folders, the bundled photos) for validation and ``eval.py``.
"""
