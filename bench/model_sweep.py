"""Model and optimiser sweep for the FedAvg job, simulated in one process (GPU if there is one).

    python -m bench.model_sweep [--storage DIR] [--data-source DIR]   (GRID='[[model, opt, lr, ls, rounds], ...]')

Reproduces the job's schedule exactly (3 stratified shards, one seeded start, batch 100, 2 epochs,
one-cycle LR, FedAvg every 1/rounds of the steps) for each candidate, three seeds each, and
prints final test accuracy and multiply-adds per image. It chose training/model.py's Net
(`d4_24` here), Adam 5e-3 and label smoothing 0.1; results in bench/results/model_sweep.json
(run on an NVIDIA H200: the whole grid takes ~5 minutes there, hours on 2 CPU cores).
"""
import argparse, json, os, sys, time
import torch, torch.nn as nn, torch.nn.functional as F
from training.data import fetch_mnist, load_mnist, stratified_shards
from training.model import Net, to_input
from training.aggregation import FedAvg
from training.storage import resolve_storage
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--storage"); parser.add_argument("--data-source")
cli = parser.parse_args()
dev = "cuda" if torch.cuda.is_available() else "cpu"
storage = resolve_storage(cli.storage); fetch_mnist(storage, cli.data_source)
(X, Y), (TX, TY) = load_mnist(storage, train=True), load_mnist(storage, train=False)
Xn, TXn = to_input(X).to(dev), to_input(TX).to(dev); Y, TY = Y.to(dev), TY.to(dev)
shards = [torch.from_numpy(s).to(dev) for s in stratified_shards(Y.cpu().numpy(), 3, 0)]

def block(i, o): return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
class Deep(nn.Module):
    def __init__(self, c=(32, 64, 128), fc=128, drop=0.25, act=nn.ReLU):
        super().__init__()
        self.f = nn.Sequential(*block(1, c[0]), nn.MaxPool2d(2), *block(c[0], c[1]), nn.MaxPool2d(2), *block(c[1], c[2]), nn.MaxPool2d(2))
        self.h = nn.Sequential(nn.Flatten(), nn.Linear(c[2] * 9, fc), nn.ReLU(), nn.Dropout(drop), nn.Linear(fc, 10))
    def forward(self, x): return self.h(self.f(x))
class Deep4(nn.Module):  # two convs at 14x14
    def __init__(self, c=(32, 64, 128), drop=0.25):
        super().__init__()
        self.f = nn.Sequential(*block(1, c[0]), nn.MaxPool2d(2), *block(c[0], c[1]), *block(c[1], c[1]), nn.MaxPool2d(2), *block(c[1], c[2]), nn.MaxPool2d(2))
        self.h = nn.Sequential(nn.Flatten(), nn.Linear(c[2] * 9, 128), nn.ReLU(), nn.Dropout(drop), nn.Linear(128, 10))
    def forward(self, x): return self.h(self.f(x))
class GAP(nn.Module):  # global average pool head
    def __init__(self, c=(32, 64, 128)):
        super().__init__()
        self.f = nn.Sequential(*block(1, c[0]), nn.MaxPool2d(2), *block(c[0], c[1]), nn.MaxPool2d(2), *block(c[1], c[2]))
        self.h = nn.Linear(c[2], 10)
    def forward(self, x): return self.h(self.f(x).mean((2, 3)))
MODELS = {"d4_16": lambda: Deep4(c=(16, 48, 96), drop=0.0), "d4_24": lambda: Deep4(c=(24, 48, 96), drop=0.0),
          "d4_nodrop": lambda: Deep4(drop=0.0), "deep_nodrop_fc256": lambda: Deep(drop=0.0, fc=256), "net": Net, "deep": Deep, "deep_nodrop": lambda: Deep(drop=0.0), "deep_wide": lambda: Deep(c=(32, 64, 192), fc=256),
          "deep4": Deep4, "gap": GAP, "deep_c48": lambda: Deep(c=(32, 48, 96))}

def macs(m):
    total = 0
    def hook(mod, i, o):
        nonlocal total
        if isinstance(mod, nn.Conv2d): total += o.numel() * mod.in_channels * 9
        if isinstance(mod, nn.Linear): total += mod.in_features * mod.out_features
    hs = [x.register_forward_hook(hook) for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
    m(torch.zeros(1, 1, 28, 28, device=dev)); [h.remove() for h in hs]; return total

def run(model, opt, lr, ls, rounds, seed, epochs=2, batch=100):
    torch.manual_seed(seed); init = MODELS[model]().to(dev).state_dict()
    workers = []
    for r in range(3):
        m = MODELS[model]().to(dev); m.load_state_dict(init)
        o = torch.optim.Adam(m.parameters(), lr=lr) if opt == "adam" else torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        steps = epochs * 200
        s = torch.optim.lr_scheduler.OneCycleLR(o, max_lr=lr, total_steps=steps)
        g = torch.Generator(device="cpu").manual_seed(seed * 1000 + r)
        idx = shards[r]
        order = torch.cat([torch.randperm(len(idx), generator=g) for _ in range(epochs)]).to(dev)
        workers.append((m, o, s, idx[order].split(batch)))
    steps = len(workers[0][3]); accs = []
    for rd in range(rounds):
        a, b = steps * rd // rounds, steps * (rd + 1) // rounds
        states = []
        for m, o, s, batches in workers:
            m.train()
            for i in batches[a:b]:
                o.zero_grad(); F.cross_entropy(m(Xn[i]), Y[i], label_smoothing=ls).backward(); o.step(); s.step()
            states.append((m.state_dict(), 20000))
        avg = FedAvg().aggregate(states)
        for m, *_ in workers: m.load_state_dict(avg)
        m = workers[0][0]; m.eval()
        with torch.no_grad(): accs.append((m(TXn).argmax(1) == TY).float().mean().item())
    return accs

grid = []
for model in MODELS:
    grid += [(model, "adam", 3e-3, 0.0, 4), (model, "adam", 3e-3, 0.1, 4), (model, "sgd", 0.1, 0.1, 4)]
grid += [("deep", "adam", 5e-3, 0.1, 4), ("deep", "adam", 3e-3, 0.1, 8), ("deep", "sgd", 0.2, 0.1, 4), ("deep", "sgd", 0.05, 0.0, 4),
         ("deep4", "adam", 5e-3, 0.1, 4), ("gap", "adam", 1e-2, 0.1, 4), ("net", "sgd", 0.1, 0.0, 4), ("deep_wide", "adam", 3e-3, 0.1, 8)]
if os.environ.get("GRID"): grid = [tuple(g) for g in json.loads(os.environ["GRID"])]
results = []
t0 = time.time()
for cfg in grid:
    accs = [run(*cfg, seed=s)[-1] for s in (0, 1, 2)]
    row = {"cfg": cfg, "macs": macs(MODELS[cfg[0]]().to(dev)), "acc": accs, "mean": sum(accs) / 3}
    results.append(row); print(json.dumps(row), f"{time.time() - t0:.0f}s", flush=True)
    json.dump(results, open(os.path.join(os.environ.get("OUT", "bench/results"), "model_sweep.json"), "w"), indent=1)
