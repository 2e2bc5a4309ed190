"""Random (non-init) weights for parity tests: every leaf drawn, so zero-initialised layers hide nothing."""
import jax
import numpy as np


def random_params(abstract_tree, seed=0):
    """A params tree shaped like ``abstract_tree`` (ShapeDtypeStructs) with random float32 leaves:
    kernels ~ N(0, 1/fan_in), norm scales ~ 1 + 0.2 N, biases ~ 0.1 N."""
    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_tree)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            a = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name == "scale":
            a = 1.0 + 0.2 * rng.standard_normal(leaf.shape)
        else:
            a = 0.1 * rng.standard_normal(leaf.shape)
        return a.astype(np.float32)

    return jax.tree_util.tree_unflatten(treedef, [draw(p, leaf) for p, leaf in flat])
