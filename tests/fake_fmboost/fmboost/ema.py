import copy

import torch


class EMA:
    def __init__(self, model, beta=0.999, update_after_step=0, update_every=1, power=0.75,
                 include_online_model=False):
        self.online, self.beta = model, beta
        self.ema_model = copy.deepcopy(model)

    @torch.no_grad()
    def update(self):
        for e, p in zip(self.ema_model.parameters(), self.online.parameters()):
            e.lerp_(p, 1 - self.beta)
