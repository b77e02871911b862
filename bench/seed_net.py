"""The seed project's network: bench_training.py's baseline, and a network whose weights serving
must refuse (tests/test_serving_lifecycle.py)."""
import torch
from torch import nn
import torch.nn.functional as F


class SeedNet(nn.Module):
    """Conv32-Conv64-MaxPool-Dropout-Dense10, as the seed project had it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.dropout = nn.Dropout(0.25)
        self.fc = nn.Linear(64 * 12 * 12, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = self.dropout(F.max_pool2d(x, 2))
        return self.fc(torch.flatten(x, 1))
