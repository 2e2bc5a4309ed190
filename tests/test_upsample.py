"""The upsampling CLI: a cascade of two tiny checkpoints on images and latents (equal to the
library's stage-by-stage computation), seeds independent of the batch, the SDE sampler,
an autoencoder first stage with tiled decoding, and bad input reported before any compute."""
import os

import jax
import numpy as np
import pytest
from PIL import Image

from cfm_jax import upsample
from cfm_jax.convert.fmboost_checkpoint import write_run_dir
from cfm_jax.solvers import SolverSpec
from cfm_jax.model import CFMUpsampler
from tests.test_trainer import run_cli, tiny_config


def _write_stage(path, config, seed):
    ups = CFMUpsampler(config)
    size = config.data.image_size // ups.first_stage.downsample_factor
    params = jax.jit(lambda k: ups.init(k, size))(jax.random.PRNGKey(seed))
    # a non-zero last layer (it is zero-initialised): the network's output matters
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(seed + 1), a.shape, a.dtype)
        if "out" in jax.tree_util.keystr(p) else a, params)
    return write_run_dir(str(path), config, params, params, source="random init (test)")


@pytest.fixture(scope="module")
def pixel_cascade(tmp_path_factory):
    """Two pixel-space stages: 8² -> 16², then 16² -> 32²."""
    root = tmp_path_factory.mktemp("cascade")
    a = tiny_config()
    a.data.update(lowres_size=8, image_size=16)
    b = tiny_config()
    b.data.update(lowres_size=16, image_size=32)
    return _write_stage(root / "a", a, 0), _write_stage(root / "b", b, 1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An 8² photo crop as PNG, and the same pixels (plus a second crop) as NCHW latents."""
    import skimage.data

    root = tmp_path_factory.mktemp("inputs")
    crops = [np.asarray(Image.fromarray(skimage.data.astronaut()[y:y + 64, x:x + 64]).resize((8, 8), Image.BOX))
             for y, x in ((100, 180), (300, 250))]
    Image.fromarray(crops[0]).save(root / "photo.png")
    lat = np.stack([c.astype(np.float32) / 127.5 - 1.0 for c in crops]).transpose(0, 3, 1, 2)  # [2, 3, 8, 8]
    np.save(root / "lat.npy", lat)
    return str(root / "photo.png"), str(root / "lat.npy"), lat


def _manual_chain(stages, x, index, seed, solver):
    """Stage after stage with the library, the key of example ``index`` as the CLI derives it."""
    root = jax.random.PRNGKey(seed)
    for s, st in enumerate(stages):
        ups = st.upsampler
        key = jax.random.fold_in(jax.random.fold_in(root, index), s)
        size = x.shape[1] * st.out_latent // st.in_latent
        x = ups.sample(st.params, x, key[None], size=size, solver=solver).x
    return np.asarray(np.round((np.clip(np.asarray(x), -1, 1) + 1) * 127.5)).astype(np.uint8)[0]


def test_cascade_cli_matches_the_library_chain(pixel_cascade, inputs, tmp_path):
    png, npy, lat = inputs
    out = tmp_path / "out"
    proc = run_cli(["-m", "cfm_jax.upsample", *[a for c in pixel_cascade for a in ("--checkpoint", c)], "--input", png, "--input", npy,
                    "--out", str(out), "--solver", "euler:3", "--batch_size", "2", "--seed", "3", "--no_progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NFE per stage [2, 2]" in proc.stdout
    got = {n: np.asarray(Image.open(out / f"{n}.png")) for n in ("photo", "lat_0", "lat_1")}
    assert all(g.shape == (32, 32, 3) for g in got.values())
    stages = upsample.load_cascade(pixel_cascade)
    solver = SolverSpec(method="euler", num_steps=3)
    for index, (name, x) in enumerate((("photo", lat[0]), ("lat_0", lat[0]), ("lat_1", lat[1]))):
        want = _manual_chain(stages, np.transpose(x, (1, 2, 0))[None], index, 3, solver)
        assert np.abs(got[name].astype(int) - want).max() <= 1, name
    # the PNG and its latent hold the same pixels and this coupling draws no noise
    assert np.abs(got["photo"].astype(int) - got["lat_0"]).max() <= 1
    assert np.abs(got["lat_0"].astype(int) - got["lat_1"]).mean() > 5  # different inputs, different outputs


def test_sde_results_do_not_depend_on_the_batch(pixel_cascade, inputs, tmp_path):
    _, npy, _ = inputs
    stages = upsample.load_cascade(pixel_cascade[:1])
    items = upsample.scan_inputs([npy], channels=3, stages=stages)
    solver = SolverSpec(method="sde_euler", num_steps=4)
    runs = []
    for bs in (1, 2):
        summary = upsample.run(stages, items, str(tmp_path / f"bs{bs}"), solver=solver, batch_size=bs, seed=5,
                               progress=False)
        assert summary["nfe_per_stage"] == [solver.expected_nfe()]
        runs.append([np.asarray(Image.open(p)).astype(int) for p in summary["outputs"]])
    for a, b in zip(*runs):
        assert np.abs(a - b).max() <= 1
    other = upsample.run(stages, items, str(tmp_path / "seed6"), solver=solver, batch_size=2, seed=6, progress=False)
    assert np.abs(np.asarray(Image.open(other["outputs"][0])).astype(int) - runs[0][0]).mean() > 0.5


def test_a_failed_solve_is_an_error_naming_the_stage_and_the_cause(pixel_cascade, inputs, tmp_path):
    _, npy, _ = inputs
    stages = upsample.load_cascade(pixel_cascade[:1])
    items = upsample.scan_inputs([npy], channels=3, stages=stages)
    solver = SolverSpec(method="dopri5", rtol=1e-12, atol=1e-12, max_steps=2)  # cannot reach t=1 in 2 steps
    with pytest.raises(RuntimeError, match=r"Stage .* failed: the adaptive solver used all its "
                                           r"max_steps \(2 steps.*lat\.npy.*try another --solver"):
        upsample.run(stages, items, str(tmp_path / "out"), solver=solver, batch_size=2, progress=False,
                     check_memory=False)
    assert not os.path.exists(tmp_path / "out" / "lat_0.png")


def test_cascade_order_and_resolution_checks(pixel_cascade, inputs, tmp_path):
    a, b = pixel_cascade
    with pytest.raises(upsample.UpsampleError, match="outputs 32² pixels but the next stage"):
        upsample.load_cascade([b, a], read_weights=False)
    stages = upsample.load_cascade([a, a], read_weights=False, any_resolution=True)
    upsample.read_stage_weights(stages)
    items = upsample.scan_inputs([inputs[0]], channels=3, stages=stages, any_resolution=True)
    summary = upsample.run(stages, items, str(tmp_path / "aa"), solver=SolverSpec(method="euler", num_steps=2),
                           progress=False)
    assert np.asarray(Image.open(summary["outputs"][0])).shape == (32, 32, 3)
    with pytest.raises(upsample.UpsampleError, match="--any_resolution"):
        upsample.scan_inputs([inputs[0]], channels=3, stages=upsample.load_cascade([b], read_weights=False))


def test_weights_that_do_not_fit_the_config_are_rejected(pixel_cascade, tmp_path):
    import json
    import shutil

    bad = str(tmp_path / "bad")
    shutil.copytree(pixel_cascade[0], bad)
    with open(os.path.join(bad, "config.json")) as f:
        cfg = json.load(f)
    cfg["model"]["model_channels"] = 64
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(upsample.UpsampleError, match="do not fit its config.json"):
        upsample.load_cascade([bad])


@pytest.fixture(scope="module")
def latent_stage(tmp_path_factory):
    """The paper's coupling (PSU, noising step 400, context) on a tiny random autoencoder (factor 2):
    16² -> 32² pixels, 8² -> 16² latents."""
    from cfm_jax.first_stage import save_converted
    from cfm_jax.models.autoencoder import AutoencoderKL, abstract_params
    from tests.random_weights import random_params
    from tests.test_first_stage import TINY

    root = tmp_path_factory.mktemp("latent")
    model = AutoencoderKL(**TINY)
    save_converted(str(root / "ae"), model, random_params(abstract_params(model), seed=7), scale_factor=0.18215,
                   source="random")
    c = tiny_config()
    c.first_stage.update(name="autoencoder", path=str(root / "ae"), scale_factor=-1.0)
    c.coupling.update(upsampling_mode="psu", noising_step=400, concat_context=True)
    c.model.update(in_channels=8, out_channels=4)
    c.data.update(lowres_size=16, image_size=32)
    return _write_stage(root / "stage", c, 2)


def test_latents_through_an_autoencoder_with_tiled_decoding(latent_stage, tmp_path):
    np.savez(tmp_path / "sd.npz", latents=np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32))
    stages = upsample.load_cascade([latent_stage])
    items = upsample.scan_inputs([str(tmp_path / "sd.npz")], channels=4, stages=stages)
    assert [it.name for it in items] == ["sd_0", "sd_1"] and items[0].shape == (8, 8, 4)
    runner = upsample.CascadeRunner(stages, SolverSpec(), decode_tile=8)
    assert runner.decoder(16).tile_size == 8 and upsample.CascadeRunner(stages, SolverSpec()).decoder(16).tile_size == 0
    tiled = upsample.run(stages, items, str(tmp_path / "tiled"), solver=SolverSpec(method="euler", num_steps=3),
                         batch_size=2, decode_tile=8, save_latents=True, progress=False)
    whole = upsample.run(stages, items, str(tmp_path / "whole"), solver=SolverSpec(method="euler", num_steps=3),
                         batch_size=2, decode_tile=0, progress=False)
    a, b = (np.asarray(Image.open(r["outputs"][0])).astype(int) for r in (tiled, whole))
    assert a.shape == b.shape == (32, 32, 3)
    assert 0 < np.abs(a - b).mean() < 20  # tiles see less context: close, not equal
    assert np.load(tmp_path / "tiled" / "sd_0.npy").shape == (16, 16, 4)


def test_bad_inputs_are_all_reported_before_any_compute(latent_stage, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(np.zeros((15, 15, 3), np.uint8)).save(d / "odd.png")  # not divisible by the factor 2
    Image.fromarray(np.zeros((16, 12, 3), np.uint8)).save(d / "wide.png")  # not square
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "big.png")  # trained on 16² inputs
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    np.save(d / "rgb.npy", np.zeros((1, 3, 8, 8), np.float32))  # 3 channels, the autoencoder has 4
    np.save(d / "small.npy", np.zeros((4, 6, 6), np.float32))  # 6² latents, trained on 8²
    out = tmp_path / "out"
    proc = run_cli(["-m", "cfm_jax.upsample", "--checkpoint", latent_stage, "--input", str(d), "--input",
                    str(tmp_path / "missing.png"), "--out", str(out)])
    assert proc.returncode == 2
    err = proc.stderr
    for needle in ("odd.png: side 15 is not divisible by 2", "wide.png: the image is 12x16", "big.png: 32² pixels",
                   "broken.png: not a readable image", "rgb.npy", "small.npy: 6² latent cells",
                   "missing.png' does not exist"):
        assert needle in err, (needle, err)
    assert not out.exists()


def test_memory_is_estimated_before_any_compute_and_a_misfit_refused(latent_stage, tmp_path, monkeypatch):
    """--any_resolution at twice the trained size: every program is compiled and XLA's memory
    analysis compared with the free memory first; too little (1 MiB here) gives one clear error
    saying what could fit, and nothing is run or written (upsample.main prints it as
    ``error: ...``, exit 2, like every UpsampleError). With the real free memory it runs."""
    import re

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    stages = upsample.load_cascade([latent_stage], any_resolution=True)
    items = upsample.scan_inputs([str(tmp_path / "big.png")], channels=4, stages=stages, any_resolution=True)
    solver = SolverSpec(method="euler", num_steps=2)
    plans = []
    estimate = upsample.CascadeRunner.memory_estimate
    monkeypatch.setattr(upsample.CascadeRunner, "memory_estimate",
                        lambda self, *a: plans.append(estimate(self, *a)) or plans[-1])
    monkeypatch.setattr(upsample, "available_memory", lambda device=None: (2**20, "a small test device"))
    out = tmp_path / "refused"
    with pytest.raises(upsample.UpsampleError) as e:
        upsample.run(stages, items, str(out), solver=solver, batch_size=2, progress=False)
    assert not out.exists()
    (plan,) = plans
    assert [p.kind for p in plan] == ["encode", "stage", "decode"]
    assert plan[1].inputs == 2 * 32 * 32 * 4 * 4 + 2 * 2 * 4  # latents and keys; the weights are in memory
    assert all(p.temp > 0 and p.need > p.inputs for p in plan)
    worst = max(plan, key=lambda p: p.need)
    assert worst.need > 2**20
    msg = str(e.value)
    for needle in ("Not enough memory for 32² pixels inputs", "big.png", "at --batch_size 2", worst.what,
                   "is free (a small test device)", "Nothing was run",
                   "not even --batch_size 1", {"decode": "--decode_tile 32 (now untiled)"}.get(
                       worst.kind, "set first_stage.tile_size")):
        assert needle in msg, (needle, msg)
    max_side = int(re.search(r"inputs of at most (\d+)² pixels \(now 32²\)", msg).group(1))
    assert max_side == int(32 * np.sqrt(2 * 2**20 / worst.need)) // 2 * 2  # an upper bound from the area

    monkeypatch.undo()
    summary = upsample.run(stages, items, str(tmp_path / "fits"), solver=solver, batch_size=2, progress=False)
    assert np.asarray(Image.open(summary["outputs"][0])).shape == (64, 64, 3)


def test_a_fifo_among_the_inputs_is_reported_not_opened(tmp_path):
    """Opening a FIFO blocks: scan_inputs names it (in a folder and given directly) instead."""
    import threading
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    os.mkfifo(tmp_path / "direct.png")
    result = {}

    def scan():
        try:
            upsample.scan_inputs([str(folder), str(tmp_path / "direct.png")], channels=3)
        except upsample.UpsampleError as e:
            result["error"] = str(e)

    worker = threading.Thread(target=scan, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "scan_inputs blocked on a FIFO"
    assert "pipe.png: not a regular file" in result["error"]
    assert "direct.png' is not a regular file or folder" in result["error"]


def test_border_pad_samples_a_reflect_padded_source_and_crops_back():
    """sample.border_pad: same output shape, only a change of the sampled values, and clear errors."""
    c = tiny_config()
    from tests.random_weights import random_params
    up = CFMUpsampler(c)
    params = random_params(jax.eval_shape(lambda: up.init(jax.random.PRNGKey(0), 16)), seed=3)  # no zero layers
    lowres = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3), minval=-1, maxval=1)
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    solver = SolverSpec(method="euler", num_steps=3)
    plain = up.sample(params, lowres, keys, size=16, solver=solver).x
    c.sample.border_pad = 4
    padded = CFMUpsampler(c).sample(params, lowres, keys, size=16, solver=solver).x
    assert padded.shape == plain.shape == (2, 16, 16, 3)
    assert np.all(np.isfinite(padded)) and not np.allclose(padded, plain)
    c.sample.border_pad = 16
    with pytest.raises(ValueError, match=r"sample.border_pad=16 must be in \[0, 16\)"):
        CFMUpsampler(c).sample(params, lowres, keys, size=16, solver=solver)


def test_train_border_pad_is_the_loss_of_the_reflect_padded_latents():
    """train.border_pad: the flow matching loss of source, target (and context) reflect-padded with
    numpy, the same flow draw; a pad that does not fit is an error naming the key."""
    from cfm_jax import flow
    from cfm_jax.data.photos import PhotoCrops
    from tests.random_weights import random_params

    c = tiny_config()
    up = CFMUpsampler(c)
    params = random_params(jax.eval_shape(lambda: up.init(jax.random.PRNGKey(0), 16)), seed=3)
    batch = PhotoCrops("train", 16, 8, 2, seed=0).batch_at(0)
    rng = jax.random.PRNGKey(5)
    c.train.border_pad = 4
    got = np.asarray(CFMUpsampler(c).loss(params, batch, rng, train=False))

    x1, lowres = up.scaled_latents(batch)
    couple_rng, flow_rng, _ = jax.random.split(rng, 3)
    x0, context = up.coupling.source_and_context(lowres, size=16, first_stage=up.first_stage, rng=couple_rng)
    pad = lambda a: np.pad(np.asarray(a), ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")  # noqa: E731
    want = flow.velocity_loss(lambda xt, t: up.velocity(params, xt, t, None if context is None else pad(context)),
                              x0=pad(x0), x1=pad(x1), rng=flow_rng, schedule=c.flow.schedule,
                              sigma_min=c.flow.sigma_min, t_exponent=c.flow.t_exponent)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    c.train.border_pad = 0  # (up shares this config)
    assert not np.allclose(got, up.loss(params, batch, rng, train=False))  # the padding changes the loss
    c.train.border_pad = 16
    with pytest.raises(ValueError, match=r"train.border_pad=16 must be in \[0, 16\)"):
        CFMUpsampler(c).loss(params, batch, rng)



# The symmetries of the square on [B, H, W, C] arrays, written with numpy (forward, inverse), in the
# order sample.dihedral_average takes them.
def _t(a):
    return np.swapaxes(a, 1, 2)


_NUMPY_SYMMETRIES = [
    (lambda a: a, lambda a: a),
    (lambda a: a[:, :, ::-1], lambda a: a[:, :, ::-1]),
    (lambda a: a[:, ::-1], lambda a: a[:, ::-1]),
    (lambda a: a[:, ::-1, ::-1], lambda a: a[:, ::-1, ::-1]),
    (_t, _t),
    (lambda a: _t(a[:, :, ::-1]), lambda a: _t(a)[:, :, ::-1]),
    (lambda a: _t(a[:, ::-1]), lambda a: _t(a)[:, ::-1]),
    (lambda a: _t(a[:, ::-1, ::-1]), lambda a: _t(a)[:, ::-1, ::-1]),
]


@pytest.mark.parametrize("with_context", [False, True])
def test_dihedral_average_is_the_mean_velocity_over_the_squares_symmetries(with_context):
    """sample.dihedral_average = n: the mean of the network's velocity of the n transformed inputs
    (and contexts), transformed back (against numpy flips and transposes); the result is
    equivariant under those n symmetries (they form a group), the reported NFE counts the network
    evaluations, and a value that is not 1, 2, 4 or 8 is an error."""
    from tests.random_weights import random_params

    c = tiny_config()
    if with_context:
        c.coupling.concat_context = True
        c.model.in_channels = 6
    up = CFMUpsampler(c)
    params = random_params(jax.eval_shape(lambda: up.init(jax.random.PRNGKey(0), 16)), seed=3)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    ctx = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32) if with_context else None
    t = 0.3
    net = jax.jit(lambda a, b: up.velocity(params, a, t, b))
    outputs = [inv(np.asarray(net(fwd(x).copy(), None if ctx is None else fwd(ctx).copy())))
               for fwd, inv in _NUMPY_SYMMETRIES]
    assert not np.allclose(outputs[0], outputs[1], atol=1e-3)  # the network itself is not symmetric
    for n in (1, 2, 4, 8):
        c.sample.dihedral_average = n
        averaged = jax.jit(lambda a, b, u=CFMUpsampler(c): u.sampling_velocity(params, a, t, b))
        np.testing.assert_allclose(np.asarray(averaged(x, ctx)), np.mean(outputs[:n], axis=0), rtol=1e-5, atol=2e-6)
        if n > 1:
            base = np.asarray(averaged(x, ctx))
            for fwd, _ in _NUMPY_SYMMETRIES[:n]:
                moved = np.asarray(averaged(fwd(x).copy(), None if ctx is None else fwd(ctx).copy()))
                np.testing.assert_allclose(moved, fwd(base), rtol=1e-5, atol=2e-6)
    lowres = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3), minval=-1, maxval=1)
    result = CFMUpsampler(c).sample(params, lowres, jax.random.split(jax.random.PRNGKey(2), 2), size=16,
                                    solver=SolverSpec(method="euler", num_steps=3))
    assert int(np.max(result.nfe)) == 2 * 8  # two Euler steps, eight network evaluations each
    c.sample.dihedral_average = 3
    with pytest.raises(ValueError, match=r"sample.dihedral_average=3; choose one of \(1, 2, 4, 8\)"):
        CFMUpsampler(c)


def test_channelwise_upsamples_every_channel_as_a_gray_image():
    """sample.channelwise: the velocity of channel k is the mean over the output channels of the
    network's velocity of channel k repeated into all three input channels (against the network
    called once per channel, with numpy's repeat), also under the dihedral average and with
    per-example times; NFE counts one network evaluation per channel; models whose channels are
    not an image's are refused."""
    from tests.random_weights import random_params

    c = tiny_config()
    up = CFMUpsampler(c)
    params = random_params(jax.eval_shape(lambda: up.init(jax.random.PRNGKey(0), 16)), seed=4)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    t = np.array([0.2, 0.7], np.float32)
    net = jax.jit(lambda a: up.velocity(params, a, t, None))

    def per_channel(a):  # [B, H, W, 3] -> the network on each channel as a gray image, outputs averaged
        return np.stack([np.asarray(net(np.repeat(a[..., k:k + 1], 3, axis=-1))).mean(-1) for k in range(3)], -1)

    want = per_channel(x)
    assert not np.allclose(want, np.asarray(net(x)), atol=1e-3)  # not the network on the colour image
    c.sample.channelwise = True
    for n in (1, 2):
        c.sample.dihedral_average = n
        got = jax.jit(lambda a, u=CFMUpsampler(c): u.sampling_velocity(params, a, t, None))(x)
        expected = want if n == 1 else (want + per_channel(x[:, :, ::-1].copy())[:, :, ::-1]) / 2
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=2e-6)
    lowres = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3), minval=-1, maxval=1)
    result = CFMUpsampler(c).sample(params, lowres, jax.random.split(jax.random.PRNGKey(2), 2), size=16,
                                    solver=SolverSpec(method="euler", num_steps=3))
    assert int(np.max(result.nfe)) == 2 * 2 * 3  # two Euler steps, two symmetries, three channels
    c.coupling.concat_context, c.model.in_channels = True, 6
    with pytest.raises(ValueError, match=r"sample.channelwise .* without concatenated context \(coupling.concat_"):
        CFMUpsampler(c)
    c.coupling.concat_context, c.model.in_channels = False, 3
    c.first_stage.name = "autoencoder"
    with pytest.raises(ValueError, match=r"needs a pixel-space model \(first_stage.name='identity', got 'autoencoder'"):
        CFMUpsampler(c)
