"""Data path: the project's device-resident batches vs a torchvision DataLoader, in images/s.

Both sides read the same CIFAR-shaped uint8 HWC images held in memory (synthetic: CIFAR cannot be
downloaded here, and neither path's speed depends on pixel values) and apply the same recipe,
flip + reflect-pad-4 crop, then normalisation:

- device: ``DeviceData`` built once (normalised float tensors on the device), batches from
  ``train_batches(128, generator, augment=True)`` exactly as ``train.train_epochs`` takes them.
- DataLoader w0 / w2: a ``Dataset`` of the uint8 images through ``transforms.Compose([RandomCrop(32,
  padding=4, padding_mode='reflect'), RandomHorizontalFlip(), ToTensor(), Normalize(...)])`` (PIL
  per image, as torchvision's CIFAR10 does), ``DataLoader(batch_size=128, shuffle=True,
  drop_last=True, num_workers=0 or 2, pin_memory on CUDA)``, each batch moved to the device. The
  workers are persistent and started in the warm-up, so their start-up is not counted (in the
  DataLoader's favour).

Two measurements per path, alternated in rotating order: one epoch of ResNet-20 training (the
step of ``train.train_epochs``: autocast per ``resources.amp``, cross-entropy, SGD; weights reset
before each epoch), and the loader alone (batches fetched and on the device, no model).
ratio = device images/s ÷ DataLoader images/s, paired per round for the spread.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from cts_ray import config, models, runtime
from cts_ray.data import DATASETS, DeviceData
from cts_ray.train import autocast, make_optimizer, prepare, to_input

from .report import Row, alternate, cpu_model, ratio, summary

BATCH, IMAGES, WORKERS = 128, 2560, (0, 2)


class HWCImages(torch.utils.data.Dataset):
    """uint8 (N, 32, 32, 3) images and labels in memory, one PIL image per item (as torchvision's CIFAR10)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def loader(x, y, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    from torchvision import transforms as T
    info = DATASETS["cifar10"]
    tf = T.Compose([T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize(info.mean, info.std)])
    return torch.utils.data.DataLoader(HWCImages(x, y, tf), batch_size=BATCH, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       pin_memory=device.type == "cuda")


def device_data(x, y, device: torch.device) -> DeviceData:
    """As ``data.load`` builds it: float in [0, 1], on the device, normalised there."""
    info = DATASETS["cifar10"]
    mean = torch.tensor(info.mean, device=device).view(-1, 1, 1)
    std = torch.tensor(info.std, device=device).view(-1, 1, 1)
    tx = (torch.from_numpy(x).to(device).permute(0, 3, 1, 2).float().div_(255) - mean) / std
    ty = torch.from_numpy(y).to(device)
    return DeviceData(tx, ty, tx[:BATCH], ty[:BATCH], 10, (3, 32, 32), augment=True)


def run(repeats: int | None = None, quick: bool = False, device: str = "auto", images: int | None = None,
        **_) -> list[Row]:
    repeats = repeats or (2 if quick else 5)
    n = images or (2 * BATCH if quick else IMAGES)
    cfg = config.load(None, ["model.name=resnet20", f"training.batch_size={BATCH}", "training.milestones=[]",
                             f"resources.device={device}"])
    dev = runtime.configure(cfg.resources)
    amp = runtime.use_amp(cfg.resources, dev)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n, dtype=np.int64)
    data = device_data(x, y, dev)
    loaders = {w: loader(x, y, w, dev) for w in WORKERS}
    torch.manual_seed(0)
    model = prepare(models.build("resnet20", (3, 32, 32), 10), dev, amp)
    init = copy.deepcopy(model.state_dict())
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def batches(src):
        if src == "device":
            return data.train_batches(BATCH, torch.Generator().manual_seed(0), augment=True)
        return ((bx.to(dev, non_blocking=True), by.to(dev, non_blocking=True)) for bx, by in loaders[src])

    def train(src) -> float:   # images/s of one training epoch, the step of train.train_epochs
        model.load_state_dict(init)
        model.train()
        opt = make_optimizer(model, cfg.training)
        seen, loss_sum = 0, torch.zeros((), device=dev)
        sync()
        t0 = time.perf_counter()
        for bx, by in batches(src):
            with autocast(amp, dev):
                loss = F.cross_entropy(model(to_input(bx, amp)).float(), by)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * by.numel()
            seen += by.numel()
        loss_sum.item()        # the epoch's one host-device sync, as in train_epochs
        return seen / (time.perf_counter() - t0)

    def load(src) -> float:    # images/s of the batches alone
        seen = 0
        sync()
        t0 = time.perf_counter()
        for bx, by in batches(src):
            seen += by.numel()
        sync()
        return seen / (time.perf_counter() - t0)

    srcs = {"device": "device", **{f"DataLoader w{w}": w for w in WORKERS}}
    fns = {f"{name} {kind}": (lambda f=f, s=s: f(s)) for kind, f in (("train", train), ("load", load))
           for name, s in srcs.items()}
    print(f"  {n} images, batch {BATCH}, ResNet-20 on {runtime.device_name(dev) if dev.type == 'cuda' else cpu_model()}"
          f"{' (bf16 + channels_last)' if amp else ''}; {repeats} rounds", flush=True)
    try:
        ims = alternate(fns, repeats, " img/s")
    finally:
        loaders.clear()    # the last references: their persistent workers stop

    rows = []
    for kind, what in (("train", "train epoch (ResNet-20 step)"), ("load", "loader only (no model)")):
        base = ims[f"device {kind}"]
        med, spread = summary(base)
        rows.append(Row(f"device-resident + on-device aug: {what}", med, "img/s", spread, "1.00"))
        for w in WORKERS:
            other = ims[f"DataLoader w{w} {kind}"]
            r, cell = ratio(base, other)
            med, spread = summary(other)
            rows.append(Row(f"DataLoader num_workers={w}: {what}", med, "img/s", spread, cell,
                            "device/DataLoader ≥ 1", "yes" if r >= 1 else "no"))
    return rows
