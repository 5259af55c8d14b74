import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny ops: threads cost more than they give, and CI has 2 cores


class SmallCNN(nn.Module):
    """Conv + BatchNorm + Dropout + two Linears: exercises eval-mode handling in overfitting."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(4 * 16, 24)
        self.fc2 = nn.Linear(24, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = nn.functional.max_pool2d(h, 2).flatten(1)
        return self.fc2(self.drop(torch.relu(self.fc1(h))))


@pytest.fixture
def small_cnn():
    torch.manual_seed(0)
    return SmallCNN()


@pytest.fixture
def image_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 1, 8, 8, generator=g)
    y = torch.randint(0, 5, (40,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


TINY_HEAD = dict(block_out_channels=(16, 16, 32), cond_hidden_dim=16, scale_hidden_dim=16)
# training arguments that go with TINY_HEAD (fit(**TINY_TRAIN) / OCDTrainingArguments(**TINY_TRAIN))
TINY_TRAIN = dict(train_batch_size=16, progress=False)


def shapes_for(weight_shape, input_dim=5, output_dim=3, activation_dim=None, target_shape=None):
    """HeadShapes for a synthetic layer (activation_dim defaults to the weight's first dim)."""
    from ocd_hf.state import HeadShapes

    return HeadShapes(
        weight_shape=tuple(weight_shape),
        target_shape=tuple(target_shape or weight_shape),
        input_dim=input_dim,
        activation_dim=activation_dim or weight_shape[0],
        output_dim=output_dim,
    )


def shapes_of(store):
    """HeadShapes of a collection."""
    s = store[0]
    return shapes_for(
        store.weight_shape,
        s["layer_input"].numel(),
        s["model_output"].numel(),
        s["layer_output"].numel(),
        store.target_shape,
    )
