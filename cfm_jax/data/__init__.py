"""Data for cfm-jax: preparing records, and the batches of training and evaluation.

Every source yields batches as dicts of NHWC float32 arrays (``l`` = H / the first stage's
down-sampling factor; identity first stage: ``l = H``, ``C = 3``):

* ``image``          [B, H, H, 3]  high-res image in [-1, 1],
* ``image_lowres``   [B, h, h, 3]  the down-sampled image (``data.lowres_filter``), h = H // factor,
* ``latent``         [B, l, l, C]  its first-stage latent (identity stage: ``image``),
* ``latent_lowres``  [B, l, l, C]  PSU latent of the low-res image, on the high-res latent grid
                                    (identity stage: ``image_lowres`` up-sampled bilinearly to H).

Modules (imported explicitly; this package imports nothing on its own):

* :mod:`cfm_jax.data.image_ops` -- resampling with ``F.interpolate``'s semantics, the low-res
  filters, PSU up-sampling, short-side resize and crops (shared by all of the below).
* :mod:`cfm_jax.data.image_io` -- listing and loading image files, with a fixed policy for bad input.
* :mod:`cfm_jax.data.photos` -- deterministic random crops of the photos that ship with
  scikit-image (the quick start, tests).
* :mod:`cfm_jax.data.webdataset_source` -- the original's WebDataset tar shards as input to
  preparation.
* :mod:`cfm_jax.data.records` -- the on-disk format: TFDS ArrayRecord latent records.
* :mod:`cfm_jax.data.prepare` -- ``python -m cfm_jax.data.prepare``: photos, image folders or tars
  -> records (resumable, multi-process).
* :mod:`cfm_jax.data.pipeline` -- the grain loader that turns records into training batches.
* :mod:`cfm_jax.data.train_data` -- where the trainer's batches come from, for ``config.data``.
* :mod:`cfm_jax.data.eval_data` -- evaluation sets read batch by batch (records, image
  folders, the bundled photos) for validation and ``eval.py``.
"""
