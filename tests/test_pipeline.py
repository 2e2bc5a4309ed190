"""grain input pipeline over prepared records: batch contents, consistent flips, process
sharding, resuming (get_state/set_state and an orbax CheckpointManager item), workers."""
import grain
import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image

from cfm_jax.data import pipeline, prepare, records
from cfm_jax.data.image_ops import downsample

SIZE, LOWRES = 16, 8
KEYS = {"image", "image_lowres", "latent", "latent_lowres"}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """10 pixel-space records (5 photos x 2 random crops) in 3 shards."""
    src = tmp_path_factory.mktemp("src")
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"):
        Image.fromarray(getattr(skimage.data, name)()[:96, :128]).save(src / f"{name}.png")
    path = tmp_path_factory.mktemp("records") / "cfm_latents" / "1.0.0"
    prepare.prepare(str(src), str(path), image_size=SIZE, lowres_size=LOWRES, first_stage="identity",
                    crop="random", crops_per_image=2, images_per_shard=2, batch_size=4, progress=False)
    assert len(records.data_source(str(path), "train")) == 10
    return str(path)


def _ids(batch):
    return [(str(f), int(c)) for f, c in zip(batch["file_name"], batch["crop_index"])]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_keys_shapes_dtypes_and_values(out):
    loader = pipeline.make_record_loader(out, batch_size=4, shuffle=False, num_epochs=1, keep_metadata=True,
                                         process_index=0, process_count=1)
    batches = list(loader)
    assert len(batches) == 2  # 10 records, drop_remainder
    source = records.data_source(out, "train")
    by_id = {(source[i]["file_name"].decode(), int(source[i]["crop_index"])): source[i] for i in range(len(source))}
    for batch in batches:
        assert KEYS <= set(batch)
        assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image_lowres"].shape == (4, LOWRES, LOWRES, 3)
        assert batch["latent"].shape == batch["latent_lowres"].shape == (4, SIZE, SIZE, 3)
        for k in KEYS:
            assert batch[k].dtype == np.float32, k
        for i, rid in enumerate(_ids(batch)):
            rec = by_id[rid]
            np.testing.assert_array_equal(batch["image"][i], rec["image"].astype(np.float32) / np.float32(127.5) - 1)
            np.testing.assert_array_equal(batch["latent"][i], rec["latent"])
            np.testing.assert_array_equal(batch["latent_lowres"][i], rec["latent_lowres"])
        np.testing.assert_allclose(batch["image_lowres"], downsample(batch["image"], SIZE // LOWRES), atol=1e-6)
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    plain = next(iter(pipeline.make_record_loader(out, batch_size=4, shuffle=False, process_index=0,
                                                  process_count=1)))
    assert set(plain) == KEYS  # metadata dropped by default


def test_flip_is_consistent_across_keys(out):
    kw = dict(batch_size=10, shuffle=False, num_epochs=1, process_index=0, process_count=1, keep_metadata=True)
    ref = next(iter(pipeline.make_record_loader(out, **kw)))
    flipped = next(iter(pipeline.make_record_loader(out, flip=True, keep_flip_marker=True, seed=3, **kw)))
    assert _ids(ref) == _ids(flipped)
    f = flipped["flipped"]
    assert 0 < f.sum() < len(f), f  # some flipped, some not (fixed seed)
    for k in KEYS:
        np.testing.assert_array_equal(flipped[k][~f], ref[k][~f], err_msg=k)
        np.testing.assert_array_equal(flipped[k][f], ref[k][f][:, :, ::-1], err_msg=k)
    # latents of the identity stage equal the image: the flipped image is still its flipped latent
    np.testing.assert_allclose(flipped["latent"], flipped["image"], atol=1e-6)
    np.testing.assert_allclose(flipped["image_lowres"], downsample(flipped["image"], 2), atol=1e-6)
    again = next(iter(pipeline.make_record_loader(out, flip=True, keep_flip_marker=True, seed=3, **kw)))
    _assert_same(flipped, again)  # deterministic given the seed


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_processes_read_disjoint_records_covering_the_epoch(out, shuffle):
    seen = []
    for p in range(2):
        loader = pipeline.make_record_loader(out, batch_size=1, shuffle=shuffle, seed=5, num_epochs=1,
                                             process_index=p, process_count=2, keep_metadata=True)
        seen.append([rid for b in loader for rid in _ids(b)])
    assert len(seen[0]) == len(seen[1]) == 5
    assert not set(seen[0]) & set(seen[1])
    source = records.data_source(out, "train")
    everything = {(source[i]["file_name"].decode(), int(source[i]["crop_index"])) for i in range(len(source))}
    assert set(seen[0]) | set(seen[1]) == everything


def _loader(out, **kw):
    return pipeline.make_record_loader(out, batch_size=3, seed=7, flip=True, process_index=0, process_count=1, **kw)


def _restored(loader, state: bytes):
    """A fresh iterator of ``loader`` at ``state`` (grain's ``get_state()``: what the checkpoint's
    ``data`` item holds)."""
    it = iter(loader)
    it.set_state(state)
    return it


def test_resume_from_state_matches_uninterrupted(out):
    it = iter(_loader(out))
    reference = [next(it) for _ in range(8)]  # crosses epoch boundaries (10 records, batch 3)
    it = iter(_loader(out))
    for _ in range(3):
        next(it)
    state = it.get_state()
    resumed = _restored(_loader(out), state)
    for want in reference[3:]:
        _assert_same(next(resumed), want)


def test_resume_from_orbax_checkpoint_manager(out, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    it = iter(_loader(out))
    reference = [next(it) for _ in range(6)]
    it = iter(_loader(out))
    for _ in range(2):
        next(it)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    next(it)  # moves on after saving: must not affect the checkpoint
    mngr.close()

    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
    assert mngr.latest_step() == 2
    fresh = iter(_loader(out))
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    mngr.close()
    for want in reference[2:]:
        _assert_same(next(fresh), want)


def _concat(batches):
    return {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def test_worker_processes_give_the_same_examples(out):
    """grain batches inside each worker: with W workers, output batch ``j * W + w`` is worker
    ``w``'s ``j``-th batch, made of the records at global positions ``w + W * (j * B + t)``.
    So the batches are identical to ``worker_count=0`` only for ``W <= 1``; with ``W = 2``
    every example (values, flip) is identical, regrouped by that fixed permutation."""
    w, b, n = 2, 3, 4
    it0 = iter(_loader(out, worker_count=0, keep_metadata=True))
    ref = _concat([next(it0) for _ in range(n)])
    it2 = iter(_loader(out, worker_count=w, keep_metadata=True))
    got = _concat([next(it2) for _ in range(n)])
    order = [wk + w * (j * b + t) for k in range(n) for j, wk in [divmod(k, w)] for t in range(b)]
    assert sorted(order) == list(range(n * b))
    _assert_same(got, {k: v[order] for k, v in ref.items()})
    # resuming a worker iterator from its state continues it exactly
    state = it2.get_state()
    want = [next(it2) for _ in range(2)]
    resumed = _restored(_loader(out, worker_count=w, keep_metadata=True), state)
    for batch in want:
        _assert_same(next(resumed), batch)


def test_loader_batches_become_data_sharded_global_arrays(out):
    """As the trainer does it: the loader's numeric arrays through ``sharding.shard_batch``."""
    from cfm_jax.sharding import shard_batch

    batch = next(iter(pipeline.make_record_loader(out, batch_size=2 * jax.device_count(), process_index=0,
                                                  process_count=1)))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    glob = shard_batch(batch, mesh)
    for k in KEYS:
        assert isinstance(glob[k], jax.Array) and glob[k].shape == batch[k].shape
        assert glob[k].sharding.spec == jax.sharding.PartitionSpec("data")
        np.testing.assert_array_equal(np.asarray(glob[k]), batch[k])
