"""Training on prepared records: the iterator position is saved in the checkpoint (a resumed run
sees the batches an uninterrupted run would), records that do not fit the config are rejected,
the bundled photos are prepared once (eval.py on records: tests/test_eval.py)."""
import os
import shutil

import jax
import numpy as np
import pytest

from cfm_jax import checkpointing
from cfm_jax.data import records, train_data
from cfm_jax.trainer import train
from tests.test_trainer import losses, read_state, tiny_config


@pytest.fixture(scope="module")
def photo_records(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("photo_records"))
    train_data.ensure_photo_records(path, image_size=16, lowres_size=8, progress=False)
    return path


def records_config(path, **train_kw):
    c = tiny_config(**train_kw)
    c.data.update(name="records", path=path, prepare_photos=False, flip=True)
    return c


def test_photo_records_are_prepared_once(photo_records):
    meta = records.dataset_metadata(photo_records)
    assert (meta["image_size"], meta["lowres_size"], meta["latent_channels"]) == (16, 8, 3)
    assert meta["first_stage"]["kind"] == "identity"
    n_train = len(records.data_source(photo_records, "train"))
    n_val = len(records.data_source(photo_records, "validation"))
    assert n_train == 11 * train_data.PHOTO_TRAIN_CROPS and n_val == 4 * train_data.PHOTO_VAL_CROPS
    info = os.path.join(photo_records, "dataset_info.json")
    before = os.stat(info).st_mtime_ns
    train_data.ensure_photo_records(photo_records, image_size=16, lowres_size=8, progress=False)
    assert os.stat(info).st_mtime_ns == before  # nothing rewritten


def test_resumed_run_sees_the_same_batches(photo_records, tmp_path):
    straight = str(tmp_path / "straight")
    train(records_config(photo_records, num_steps=6), straight)
    resumed = str(tmp_path / "resumed")
    first = train(records_config(photo_records, num_steps=3), resumed)
    assert first["final_step"] == 3
    assert checkpointing.has_item(checkpointing.make_manager(resumed, read_only=True), 3, "data")
    # a copy of the step-3 checkpoint without the iterator: it must resume differently
    no_data = str(tmp_path / "no_data")
    shutil.copytree(resumed, no_data)
    shutil.rmtree(os.path.join(no_data, "checkpoints", "3", "data"))

    second = train(records_config(photo_records, num_steps=6), resumed)
    assert second["start_step"] == 3 and second["final_step"] == 6
    a, b = read_state(straight, 6), read_state(resumed, 6)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(losses(straight), losses(resumed))

    train(records_config(photo_records, num_steps=6), no_data)  # restarts the data order: other batches
    assert not np.array_equal(losses(straight)[3:], losses(no_data)[3:])


def test_records_that_do_not_fit_the_config_are_rejected(photo_records, tmp_path):
    c = records_config(photo_records)
    c.data.update(image_size=32, lowres_size=16)
    with pytest.raises(ValueError, match=r"image_size: records 16, config/first stage 32"):
        train(c, str(tmp_path / "a"))
    c = records_config(photo_records)
    c.data.train_split = "nope"
    with pytest.raises(ValueError, match="no split 'nope'"):
        train(c, str(tmp_path / "b"))
    c = records_config(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="python -m cfm_jax.data.prepare"):
        train(c, str(tmp_path / "c"))
    assert not any(os.path.exists(str(tmp_path / d)) for d in "abc")  # rejected before writing
