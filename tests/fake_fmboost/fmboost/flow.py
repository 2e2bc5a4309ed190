import torch
from torch import nn


class FlowModel(nn.Module):
    def __init__(self, net_cfg, schedule="linear", sigma_min=0.0):
        super().__init__()
        self.net = net_cfg

    def training_losses(self, x1, x0, **cond):
        t = torch.rand(x1.shape[0])
        xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
        return (self.net(xt, t, **cond) - (x1 - x0)).square().mean()

    def generate(self, x, sample_kwargs, **cond):
        ts = torch.linspace(0, 1, sample_kwargs["num_steps"])
        for t0, t1 in zip(ts[:-1], ts[1:]):
            x = x + (t1 - t0) * self.net(x, t0.expand(x.shape[0]), **cond)
        return x
