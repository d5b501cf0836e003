"""Small models the tests share."""

from __future__ import annotations

import torch.nn as nn

from ponder.models.multi_exit import MultiExitModel


class ToyExits(MultiExitModel):
    """Three exits on ``size`` x ``size`` inputs: one conv block per exit (``strides`` its convs' strides), each exit
    a pooled Linear. ``norm=False``: conv (with bias) + ReLU, no BatchNorm, so a batch split over processes computes
    what the whole batch does; ``norm=True``: conv (no bias) + BatchNorm + ReLU."""

    def __init__(self, num_classes: int = 10, width: int = 6, strides: tuple[int, int, int] = (2, 2, 2),
                 norm: bool = False, size: int = 32):
        super().__init__()
        self.num_classes, self.num_exits, self.default_input_size = num_classes, 3, (3, size, size)
        self.blocks = nn.ModuleList(_block(cin, width, stride, norm) for cin, stride in zip((3, width, width), strides))
        self.heads = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(3))

    def run_block(self, k, state):
        return self.blocks[k](state)

    def exit_features(self, k, state):
        return state.mean((2, 3))

    def exit_classifier(self, k, feat):
        return self.heads[k](feat)

    def exit_feature_dims(self):
        return [self.heads[0].in_features] * 3

    def stage_modules(self, k):
        return [self.blocks[k]]

    def exit_modules(self, k):
        return [self.heads[k]]


def _block(cin: int, width: int, stride: int, norm: bool) -> nn.Sequential:
    """3x3 conv (``stride``) + ReLU, with a BatchNorm between them (and no conv bias) when ``norm``."""
    if norm:
        return nn.Sequential(nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
    return nn.Sequential(nn.Conv2d(cin, width, 3, stride, 1), nn.ReLU())
