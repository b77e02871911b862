"""The digit classifier, shared by training and serving.

In the spirit of PyTorch's examples/mnist, with BatchNorm after every convolution and most of
the convolutions at 14x14 and below: the first layer is a 5x5 convolution with stride 2, straight
to 14x14, because normalising and pooling full-size 28x28 activations costs a visible share of a
step for no accuracy (bench/model_sweep.py compares the candidates; docs/BENCHMARKS.md has the
figures). NetV1 is kept to load the versions published with the earlier architecture.
"""
import copy

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

# Mean and std of MNIST training pixels in [0, 1]; serving normalises the same way.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def conv_bn(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class Net(nn.Module):
    architecture = "net-v2"  # published with every version, so that serving builds the right network

    def __init__(self):
        super().__init__()
        self.features = self.layers()
        self.fc1 = nn.Linear(96 * 3 * 3, 128)
        self.fc2 = nn.Linear(128, 10)
        # NHWC: oneDNN's CPU convolutions are faster channels-last, in training and at inference
        # (docs/BENCHMARKS.md has the step times).
        self.to(memory_format=torch.channels_last)

    @staticmethod
    def layers() -> nn.Sequential:
        return nn.Sequential(
            conv_bn(1, 24, kernel=5, stride=2),                 # 24 x 14 x 14
            conv_bn(24, 48), conv_bn(48, 48), nn.MaxPool2d(2),  # 48 x 7 x 7
            conv_bn(48, 96), nn.MaxPool2d(2),                   # 96 x 3 x 3
        )

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.fc1(torch.flatten(self.features(x), 1)))
        return self.fc2(x)  # logits


class NetV1(Net):
    """The network of the versions whose metadata names no architecture (the first published ones):
    a 3x3 convolution at 28x28, then 2x2 pooling. Kept so that serving still loads
    them, and can roll back to one."""
    architecture = "net-v1"

    @staticmethod
    def layers() -> nn.Sequential:
        return nn.Sequential(
            conv_bn(1, 24), nn.MaxPool2d(2),                    # 24 x 14 x 14
            conv_bn(24, 48), conv_bn(48, 48), nn.MaxPool2d(2),  # 48 x 7 x 7
            conv_bn(48, 96), nn.MaxPool2d(2),                   # 96 x 3 x 3
        )


ARCHITECTURES = {network.architecture: network for network in (Net, NetV1)}


def network_for(state_dict: dict, architecture: str | None = None) -> nn.Module:
    """A network holding `state_dict`: of the `architecture` a version's metadata names, or, for a
    version from before metadata named one, of the architecture its weights fit exactly.
    Raises ValueError for an unknown architecture, RuntimeError for weights that fit none."""
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ValueError(f"unknown network architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})")
    errors = []
    for network in ARCHITECTURES.values() if architecture is None else [ARCHITECTURES[architecture]]:
        net = network()
        try:
            net.load_state_dict(state_dict, strict=True)
            return net
        except RuntimeError as error:
            errors.append(f"{network.architecture}: {error}")
    raise RuntimeError("the weights fit no known network:\n" + "\n".join(errors))


def to_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 28, 28] (white digit on black) -> normalised float [N, 1, 28, 28]."""
    x = images_uint8.to(torch.float32).div_(255.0)
    return ((x - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def initial_weights(seed: int) -> dict:
    """The one set of starting weights that every worker begins from."""
    torch.manual_seed(seed)
    return Net().state_dict()


def for_inference(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference: every BatchNorm folded into the convolution before it
    (torch's `fuse_conv_bn_eval`): the same function at less cost (bench_serving --fold measures
    it). `model` is left in eval mode and otherwise unchanged.

    The copy is made by swapping modules, not by torch.fx tracing (`fuse`): a trace patches
    torch.nn.Module for the whole process while it runs, so a serving replica loading a new version
    would break the requests it answers meanwhile ("module is not installed as a submodule")."""
    model.eval()
    folded = copy.deepcopy(model)
    for block in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(block) - 1):
            if isinstance(block[i], nn.Conv2d) and isinstance(block[i + 1], nn.BatchNorm2d):
                block[i], block[i + 1] = fuse_conv_bn_eval(block[i], block[i + 1]), nn.Identity()
    return folded.to(memory_format=torch.channels_last)


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250):
    """Accuracy and mean cross-entropy of `model` on uint8 images (run on its inference copy)."""
    fused = for_inference(model)
    correct, loss = 0, 0.0
    for start in range(0, len(labels), batch_size):
        logits = fused(to_input(images[start:start + batch_size]))
        target = labels[start:start + batch_size]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return {"accuracy": correct / len(labels), "loss": loss / len(labels)}
