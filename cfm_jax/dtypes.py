"""The compute and parameter dtypes a config names (``model.dtype``, ``model.param_dtype``,
``first_stage.dtype``), in one table."""
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
