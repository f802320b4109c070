"""`python -m bench data`: folder data in memory (``data.stream: off``) against streamed from its files
(``data.stream: on``), on real CIFAR-10-JPEG images, and what a streamed trial's memory grows with.

Rows (images/s, median of alternating rounds; ratio = streamed ÷ in memory, paired per round):
- train epoch: ResNet-20, batch 128, one epoch of ``train.train_epochs`` (its record's training
  seconds; evaluation excluded), in memory vs streamed with 2 loader processes, 32 x 32.
- loader only: the same batches (augmented, normalised, on the device) with no model; and streamed at
  224 x 224 (``data.image_size: 224``: every 32 px JPEG resized up in the loader processes).
- engines (loader only, 32 x 32): Ray Data (``read_images`` + ``iter_torch_batches``, decoding in Ray
  tasks) beside ours (torch DataLoader processes decoding with PIL); and the decoders per image,
  PIL against ``torchvision.io.decode_jpeg``.
- GPU decode (on CUDA only): ``decode_jpeg(..., device="cuda")`` in batches against one CPU process,
  at 32 and 224 px (re-encoded). Decoding moves to the GPU only once this says it beats the loader
  processes (target ≥ WORKERS x one CPU process); no GPU has been lent to measure it yet.
- memory: peak RSS (the kernel's high-water marks, VmHWM: the trial's process, and its largest
  loader process) of one ``cts-ray run`` streaming generated 10,000- and 100,000-image folders (hard
  links to the CIFAR files): LeNet-300-100, SNIP, one retraining epoch. Target: within 150 MB of
  each other. (Sampled PSS of the process tree varied by ±100 MB between identical runs here, and
  getrusage's maxrss keeps the parent's peak across exec.)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cts_ray import config as C
from cts_ray import data as D
from cts_ray import image_folder, models, runtime
from cts_ray.train import prepare, train_epochs

from .report import Row, alternate, cpu_model, ratio, summary

BATCH, IMAGES, TEST, WORKERS = 128, 5120, 1000, 2
RSS_SIZES = (10_000, 100_000)
RSS_TARGET_MB = 150


def _folder(src: Path, dst: Path, train: int, test: int) -> Path:
    """An image folder of the first ``train``/``test`` images of src, as hard links (copies across
    file systems), the classes balanced."""
    for split, n in (("train", train), ("test", test)):
        classes = sorted(p.name for p in (src / split).iterdir())
        per = -(-n // len(classes))
        for c in classes:
            (dst / split / c).mkdir(parents=True)
            files = sorted((src / split / c).iterdir())
            for i in range(per):
                f = files[i % len(files)]
                target = dst / split / c / f"{i:06d}{f.suffix}"
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copy(f, target)
    return dst


def _load(root: Path, stream: str, size=None, device="cpu"):
    sets = ["data.name=image_folder", f"data.root={root}", f"data.stream={stream}", f"data.workers={WORKERS}"]
    return D.load(C.load(None, sets + ([f"data.image_size={size}"] if size else [])).data, device)


def _throughput(root: Path, repeats: int, device: str, quick: bool) -> list[Row]:
    cfg = C.load(None, ["model.name=resnet20", f"training.batch_size={BATCH}", "training.milestones=[]",
                        "training.epochs=1", f"resources.device={device}"])
    dev = runtime.configure(cfg.resources)
    amp = runtime.use_amp(cfg.resources, dev)
    sources = {"in memory": _load(root, "off", device=dev), "streamed": _load(root, "on", device=dev),
               "streamed 224": _load(root, "on", 224, dev)}
    torch.manual_seed(0)
    net = prepare(models.build("resnet20", (3, 32, 32), 10), dev, amp)
    init = {k: v.clone() for k, v in net.state_dict().items()}

    def train(name) -> float:
        net.load_state_dict(init)
        rec = next(train_epochs(net, sources[name], cfg.training, start=0, end=1, order_seed=0, amp=amp))
        return sources[name].steps_per_epoch(BATCH) * BATCH / rec["seconds"]

    def load(name) -> float:
        t0, seen = time.perf_counter(), 0
        for _, y in sources[name].train_batches(BATCH, torch.Generator().manual_seed(0)):
            seen += len(y)
        return seen / (time.perf_counter() - t0)

    fns = {"in memory train": lambda: train("in memory"), "streamed train": lambda: train("streamed"),
           "in memory load": lambda: load("in memory"), "streamed load": lambda: load("streamed"),
           "streamed 224 load": lambda: load("streamed 224"), "ray data load": lambda: _ray_data(root),
           "PIL decode": lambda: _decode(root, "pil"), "torchvision.io decode": lambda: _decode(root, "tvio")}
    if dev.type == "cuda":   # whether decoding on the GPU (nvJPEG, batched) would pay, at 32 and at 224 px
        blobs = {32: _blobs(root), 224: _blobs(root, 224)}
        for size in (32, 224):
            fns[f"cpu decode {size}"] = lambda size=size: _decode_blobs(blobs[size], "cpu")
            fns[f"gpu decode {size}"] = lambda size=size: _decode_blobs(blobs[size], dev)
    where = runtime.device_name(dev) if dev.type == "cuda" else cpu_model()
    print(f"  {sources['in memory'].n_train} images, batch {BATCH}, {WORKERS} loader processes, "
          f"{torch.get_num_threads()} torch threads, on {where}; {repeats} rounds", flush=True)
    import ray
    ours = not ray.is_initialized()   # the Ray Data row starts a local Ray; it ends with the bench
    try:
        ims = alternate(fns, repeats, " img/s")
    finally:
        if ours and ray.is_initialized():
            ray.shutdown()
    rows = []
    for kind, what in (("train", "train epoch (ResNet-20)"), ("load", "loader only")):
        base, other = ims[f"in memory {kind}"], ims[f"streamed {kind}"]
        med, spread = summary(base)
        rows.append(Row(f"in memory, 32x32: {what}", med, "img/s", spread, "1.00"))
        r, cell = ratio(other, base)
        med, spread = summary(other)
        target = ("streamed/in memory ≥ 0.7", "yes" if r >= 0.7 else "no") if kind == "train" else ()
        rows.append(Row(f"streamed, 32x32: {what}", med, "img/s", spread, cell, *target))
    base = ims["in memory load"]
    for name, label in (("streamed 224 load", "streamed, 224x224 (resized up): loader only"),
                        ("ray data load", "Ray Data read_images + iter_torch_batches, 32x32: loader only"),
                        ("PIL decode", "decode one 32x32 JPEG: PIL (ours)"),
                        ("torchvision.io decode", "decode one 32x32 JPEG: torchvision.io.decode_jpeg")):
        r, cell = ratio(ims[name], base)
        med, spread = summary(ims[name])
        rows.append(Row(label, med, "img/s", spread, cell if "decode" not in name else ""))
    for size in (32, 224) if dev.type == "cuda" else ():
        cpu, gpu = ims[f"cpu decode {size}"], ims[f"gpu decode {size}"]
        med, spread = summary(cpu)
        rows.append(Row(f"decode {size}x{size} JPEGs on the CPU: torchvision.io, one process", med, "img/s", spread,
                        "1.00"))
        r, cell = ratio(gpu, cpu)
        med, spread = summary(gpu)
        # it pays only if it beats the loader processes that decode on the CPU today
        rows.append(Row(f"decode {size}x{size} JPEGs on the GPU: decode_jpeg(device=cuda), batches of {BATCH}",
                        med, "img/s", spread, cell, f"≥ {WORKERS}x (the {WORKERS} loader processes)",
                        "yes" if r >= WORKERS else "no"))
    return rows


def _ray_data(root: Path) -> float:
    """Images/s of Ray Data reading the folder's training split as batches of BATCH tensors."""
    import logging

    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_images(str(root / "train"), include_paths=False, mode="RGB")
    t0, seen = time.perf_counter(), 0
    for batch in ds.iter_torch_batches(batch_size=BATCH, drop_last=True):
        seen += len(batch["image"])
    return seen / (time.perf_counter() - t0)


def _decode(root: Path, how: str) -> float:
    files = sorted((root / "train").rglob("*.jpg"))[:1000]
    blobs = [f.read_bytes() for f in files]
    t0 = time.perf_counter()
    if how == "pil":
        import io

        from PIL import Image
        for b in blobs:
            with Image.open(io.BytesIO(b)) as im:
                im.convert("RGB").load()
    else:
        from torchvision.io import ImageReadMode, decode_jpeg
        for b in blobs:
            decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return len(blobs) / (time.perf_counter() - t0)


def _blobs(root: Path, size=None) -> list:
    """The encoded bytes of up to 1,000 training JPEGs, re-encoded at ``size`` px when given."""
    from torchvision.io import decode_jpeg, encode_jpeg
    from torchvision.transforms.v2.functional import resize
    blobs = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8)
             for f in sorted((root / "train").rglob("*.jpg"))[:1000]]
    return blobs if size is None else [encode_jpeg(resize(decode_jpeg(b), [size, size]), quality=90) for b in blobs]


def _decode_blobs(blobs: list, device) -> float:
    """Images/s decoding ``blobs`` to RGB on ``device``: one by one on the CPU, in batches on a GPU
    (decode_jpeg's batched nvJPEG path), synchronised."""
    from torchvision.io import ImageReadMode, decode_jpeg
    t0 = time.perf_counter()
    if device == "cpu":
        for b in blobs:
            decode_jpeg(b, mode=ImageReadMode.RGB)
    else:
        for i in range(0, len(blobs), BATCH):
            decode_jpeg(blobs[i:i + BATCH], mode=ImageReadMode.RGB, device=device)
        torch.cuda.synchronize(device)
    return len(blobs) / (time.perf_counter() - t0)


# ---------------------------------------------------------------- memory

PROBE = """import json, sys
from cts_ray import cli
code = cli.main(sys.argv[1:])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"code": code, "main": hwm / 1024}))
"""


def _hwm(pid: int) -> float:
    """A process's peak RSS (MB): the kernel's high-water mark for its memory since exec (or fork)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def peak_rss(folder: Path, out: Path) -> dict:
    """Peak RSS (MB) of one `cts-ray run` streaming ``folder``: its own ("main", read by itself at the
    end: VmHWM, which starts afresh at exec, unlike getrusage's maxrss, which keeps the parent's)
    and its largest loader process's ("loader", polled: forked from the trial, so it counts the
    pages it shares with it)."""
    import json
    import psutil
    cmd = [sys.executable, "-c", PROBE, "run", "--quiet", "--out", str(out)]
    for s in ("data.name=image_folder", f"data.root={folder}", "data.stream=on", f"data.workers={WORKERS}",
              "model.name=lenet_300_100", "search.method=snip", "search.point=init", "training.epochs=1",
              "training.batch_size=128", "training.milestones=[]", "training.dense_baseline=false",
              "resources.threads=1"):
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    loader = 0.0
    while proc.poll() is None:
        try:
            loader = max([loader, *(_hwm(c.pid) for c in psutil.Process(proc.pid).children(recursive=True))])
        except psutil.Error:
            pass
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    peaks = json.loads(stdout.strip().splitlines()[-1]) if proc.returncode == 0 and stdout.strip() else {}
    if peaks.get("code") != 0:
        raise RuntimeError(f"cts-ray run failed: {stderr.strip()[-500:]}")
    return {**peaks, "loader": loader}


def _memory(src: Path, work: Path, sizes) -> list[Row]:
    peaks = {}
    for n in sizes:
        folder = _folder(src, work / f"f{n}", n, 1000)
        peaks[n] = peak_rss(folder, work / f"run{n}")
        print(f"  streamed trial on {n:,} images: peak RSS {peaks[n]['main']:.0f} MB, its largest loader process "
              f"{peaks[n]['loader']:.0f} MB", flush=True)
    small, big = sizes
    rows = []
    for who, what in (("main", "the trial's process"), ("loader", "its largest loader process")):
        grow = peaks[big][who] - peaks[small][who]
        rows += [Row(f"memory: {what}, {small:,} images: peak RSS", peaks[small][who], "MB", "", ""),
                 Row(f"memory: {what}, {big:,} images: peak RSS", peaks[big][who], "MB", "", ""),
                 Row(f"memory: {what}, {big:,} - {small:,} images", grow, "MB", "", "", f"≤ {RSS_TARGET_MB} MB",
                     "yes" if grow <= RSS_TARGET_MB else "no")]
    return rows


def run(repeats: int | None = None, quick: bool = False, device: str = "auto", data=None, **_) -> list[Row]:
    src = Path(data or "data/CIFAR-10-JPEG")
    if not (src / "train").is_dir():
        src = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "CIFAR-10-JPEG"
    repeats = repeats or (1 if quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = os.environ.get("CTS_RAY_CACHE")
        os.environ["CTS_RAY_CACHE"] = str(work / "cache")   # cold and private: no earlier run's decode
        try:
            root = _folder(src, work / "speed", 2 * BATCH if quick else IMAGES, 256 if quick else TEST)
            rows = _throughput(root, repeats, device, quick)
            if not quick:   # two full trials; tests/test_stream.py checks the bound at a tenth of the size
                rows += _memory(src, work, RSS_SIZES)
        finally:
            image_folder._LOADED.clear()
            os.environ.pop("CTS_RAY_CACHE") if cache is None else os.environ.__setitem__("CTS_RAY_CACHE", cache)
    return rows
