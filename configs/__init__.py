"""Experiment configs (ml_collections). ``load_config`` reads a config file by path, as
train.py's ``--config`` does, for scripts that need a config without a flag."""
import importlib.util
import os

PAPER_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flow400_64-128", "unet_base_psu.py")


def load_config(path: str = PAPER_CONFIG, arg=None):
    """``get_config(arg)`` of the config file at ``path`` (default: the paper's)."""
    spec = importlib.util.spec_from_file_location("_config_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
