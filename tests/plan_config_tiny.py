"""A config small enough to compile for a TPU topology in seconds (tests/test_plan.py)."""
from configs.common import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.model.update(in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1, channel_mult=(1,),
                   attention_resolutions=(), num_heads=1, dim_head=32)
    c.coupling.update(noising_step=-1, concat_context=False)
    c.data.update(image_size=16, lowres_size=8, batch_size=8)
    c.sample.update(method="euler", num_steps=3)
    return c
