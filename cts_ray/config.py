"""Typed, validated, hashable run configuration.

One dataclass per section. Every field's allowed values live next to the field (``choices`` or
``check``), so validation, error messages and the README's table come from one place. The
config hash is the run's identity: it covers what changes the result (not where data lives or
which device runs it), like open_lth's ``Desc``.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from . import layouts, names
from .datasets import DATASETS, check_root
from .errors import ConfigError
from .methods import METHODS, STRONG_INITS


def _f(default, *, choices=None, check=None, allowed=None, identity=True, help=""):
    """A config field. ``check(value) -> bool`` with ``allowed`` describing what passes.

    ``identity``: True = part of the config hash; False = never (where data lives, which device);
    "non_default" = only when set to something other than its default. Fields added after results
    existed use "non_default", so every earlier config keeps its hash (and its cached dense runs)."""
    meta = dict(choices=choices, check=check, allowed=allowed, identity=identity, help=help)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _fraction(v):
    return 0 < v <= 1


# Ray refuses (only once a trial is scheduled) resource requests finer than 0.0001, and GPU
# requests above 1 that are not whole numbers.
def _cpus(v):
    return v >= 1e-4


def _gpus(v):
    return v == 0 or 1e-4 <= v <= 1 or (v > 1 and float(v).is_integer())


MAX_WORKERS = 64


@dataclass
class DataConfig:
    name: str = _f("digits", choices=sorted(DATASETS), help="data set")
    root: Optional[str] = _f(None, identity=False,
                             help="folder holding the data set (torchvision layout); not needed for digits")
    download: bool = _f(False, identity=False, help="let torchvision download into root")
    subset: Optional[int] = _f(None, check=_positive, allowed="a positive integer or null",
                               help="use only the first N training examples (seeded shuffle)")
    test_subset: Optional[int] = _f(None, check=_positive, allowed="a positive integer or null",
                                    help="use only the first N test examples")
    augment: str = _f("auto", choices=["auto", "on", "off"],
                      help="flip + pad-4 crop on device; auto = on for CIFAR and 32x32 RGB image folders")
    image_size: Optional[int] = _f(None, check=_positive, allowed="a positive integer or null", identity="non_default",
                                   help="folder data sets: resize every image to N x N (sizes and modes may then differ)")
    stream: str = _f("auto", choices=["auto", "on", "off"], identity=False,
                     help="folder data sets: read and decode images while training (on) or decode them all "
                          "into memory first (off); auto = stream when the decoded set would exceed a quarter "
                          "of the trial's share of device memory (README \"Streaming\")")
    workers: Optional[int] = _f(None, check=_non_negative, allowed="an integer >= 0 or null", identity=False,
                                help="streamed data: decoding processes; null = one per CPU of the trial (1..8), "
                                     "0 = decode in the training process")


@dataclass
class ModelConfig:
    name: str = _f("mlp_digits", choices=sorted(names.MODELS), help="architecture")
    # The CTS authors' model details (SPEC §4); the defaults are open_lth's classic ones.
    batchnorm: str = _f("running", choices=["running", "batch"], identity="non_default",
                        help="BatchNorm statistics: running (tracked, used in eval) or batch "
                             "(track_running_stats=False: batch statistics in eval too, as the authors' models)")
    shortcut: str = _f("conv1x1", choices=["conv1x1", "conv3x3"], identity="non_default",
                       help="ResNet downsampling shortcut: 1x1 stride-2 conv, or the authors' 3x3 stride-2 conv")
    classifier_bias: str = _f("zero", choices=["zero", "pytorch"], identity="non_default",
                              help="classifier bias init: zero (SPEC §4) or PyTorch's default uniform (authors' code)")
    stem: str = _f("auto", choices=["auto", "cifar", "imagenet"], identity="non_default",
                   help="resnet18/resnet50 stem: cifar (3x3 stride-1 conv) or imagenet (7x7 stride-2 conv + 3x3 "
                        "stride-2 max-pool); auto = imagenet on tiny_imagenet and imagenet (as the authors' code), "
                        "cifar on every other data set")
    batchnorm_sync: bool = _f(False, identity="non_default",
                              help="data-parallel trials: BatchNorm statistics over the global batch "
                                   "(torch.nn.SyncBatchNorm) instead of each worker's own (the authors')")


@dataclass
class TrainingConfig:
    epochs: int = _f(30, check=_non_negative, allowed="an integer >= 0", help="full training length")
    batch_size: int = _f(64, check=_positive, allowed="an integer > 0")
    optimizer: str = _f("sgd", choices=["sgd", "adam"])
    lr: float = _f(0.1, check=_positive, allowed="a number > 0")
    momentum: float = _f(0.9, check=lambda v: 0 <= v < 1, allowed="a number in [0, 1)")
    weight_decay: float = _f(1e-4, check=_non_negative, allowed="a number >= 0")
    milestones: list = _f([15, 25], allowed="a list of integers >= 0",
                          help="epochs at which the LR is multiplied by gamma")
    gamma: float = _f(0.1, check=_positive, allowed="a number > 0")
    grad_clip: Optional[float] = _f(None, check=_positive, allowed="a number > 0 or null",
                                    help="global gradient-norm clip")
    dense_baseline: bool = _f(True, help="train the dense network to the end to report its accuracy")
    retrain: Optional[bool] = _f(None, help="retrain the ticket from the search point to the end; "
                                            "null = yes, except for strong-ticket methods")
    loss_reduction: str = _f("mean", choices=["mean", "sum"], identity="non_default",
                             help="cross-entropy over the batch: mean, or sum as the authors' code "
                                  "(with grad_clip ~ normalised SGD)")
    warmup_epochs: int = _f(0, check=_non_negative, allowed="an integer >= 0", identity="non_default",
                            help="LR warm-up: over the first N epochs the LR rises linearly per step, step i of "
                                 "N x steps_per_epoch at i / (N x steps_per_epoch) of its value (the authors' "
                                 "Tiny-ImageNet: 10, ImageNet: 5)")


@dataclass
class SearchConfig:
    method: str = _f("cts", choices=sorted(METHODS), help="ticket method")
    density: float = _f(0.05, check=_fraction, allowed="a number in (0, 1]",
                        help="fraction of prunable weights kept")
    point: str = _f("rewind", choices=["init", "rewind"], help="weights the mask is searched on")
    rewind_epochs: int = _f(1, check=_non_negative, allowed="an integer >= 0",
                            help="dense epochs before the search when point = rewind")
    objective: str = _f("kl_reverse", choices=sorted(names.OBJECTIVES))
    controller: str = _f("gradbalance", choices=["gradbalance", "lagrange"])
    temperature: float = _f(2 / 3, check=_positive, allowed="a number > 0",
                            help="Concrete temperature tau")
    length: float = _f(0.5, check=_fraction, allowed="a number in (0, 1]",
                       help="search epochs as a fraction of training.epochs")
    lr: Optional[float] = _f(None, check=_positive, allowed="a number > 0 or null",
                             help="mask learning rate; null = training.lr")
    lr_drop: float = _f(0.88, check=_fraction, allowed="a number in (0, 1]",
                        help="fraction of the search after which the mask LR is multiplied by 0.1")
    slack: float = _f(0.1, check=_non_negative, allowed="a number >= 0",
                      help="GradBalance budget slack over kappa*d")
    rescale: str = _f("none", choices=["none", "layer", "global"], identity="non_default",
                      help="cts: during the search, scale the soft-masked weights by numel / sum(mask) of each "
                           "layer (layer) or of the whole net (global), so the masked net keeps about the dense "
                           "activation scale (an experiment; off by default)")
    sanity: str = _f("none", choices=["none", "shuffle", "invert", "reinit"],
                     help="sanity-check change applied to the ticket before retraining")
    # method-specific knobs (SPEC §2 defaults)
    examples_per_class: int = _f(10, check=_positive, allowed="an integer > 0",
                                 help="snip/grasp: scoring batch size per class")
    grasp_temperature: float = _f(200.0, check=_positive, allowed="a number > 0",
                                  help="grasp: logits are divided by this")
    synflow_rounds: int = _f(100, check=_positive, allowed="an integer > 0",
                             help="synflow: pruning rounds (exponential density schedule)")
    ltr_fraction: float = _f(0.2, check=lambda v: 0 < v < 1, allowed="a number in (0, 1)",
                             help="ltr: fraction of the remaining weights pruned per round")
    ltr_output_fraction: Optional[float] = _f(None, check=lambda v: 0 < v < 1,
                                              allowed="a number in (0, 1) or null",
                                              help="ltr: separate per-round fraction for the classifier "
                                                   "(Frankle & Carbin: 0.1); null = pruned globally")
    gate_sigma: float = _f(0.5, check=_positive, allowed="a number > 0",
                           help="gates: noise std of the relaxed Bernoulli gates")
    strong_init: Optional[str] = _f(None, choices=[None, *STRONG_INITS],
                                    identity="non_default",
                                    help="gates/edge_popup: the frozen weights a strong ticket selects from; null = the "
                                         "method's paper default (gates: kaiming_uniform, edge_popup: signed_constant); "
                                         "set, both methods draw the same weights for a seed")
    lr_drop_at: str = _f("step", choices=["step", "epoch"], identity="non_default",
                         help="cts: mask LR drop after step int(lr_drop x search steps), or after epoch "
                              "int(lr_drop x search epochs) as the authors' code")
    loss_scale: float = _f(1.0, check=_positive, allowed="a number > 0", identity="non_default",
                           help="cts: multiplies the search objective (and the controller's pull); authors: 100")
    step: str = _f("exact", choices=["exact", "fused"], identity="non_default",
                   help="cts: exact = the reference step (noise from the generator's stream, torch's Adam; the "
                        "same masks eager or compiled); fused = counter-based noise drawn inside one compiled mask "
                        "pass and torch's fused Adam: fewer passes over the logits, another random stream")


@dataclass
class ResourcesConfig:
    device: str = _f("auto", choices=["auto", "cpu", "cuda"], identity=False, help="compute device")
    threads: Optional[int] = _f(None, check=_positive, allowed="a positive integer or null",
                                identity=False, help="torch CPU threads; null = 1 for models under 1 M parameters, "
                                                     "else up to 4 (in sweeps: up to resources.cpus)")
    amp: bool = _f(True, identity=False, help="bf16 autocast and channels_last on CUDA (ignored on CPU)")
    compile: bool = _f(False, identity=False,
                       help="torch.compile the training step of dense training and retraining (pays off on GPUs)")
    compile_search: Optional[bool] = _f(None, identity=False,
                                        help="torch.compile the CTS search step (same masks as eager on CPU); null = "
                                             "when the search is long enough to repay the compile (seconds, cached "
                                             "on disk)")
    cpus: float = _f(1, check=_cpus, allowed="a number >= 0.0001", identity=False,
                     help="CPUs per trial in sweeps")
    gpus: float = _f(0, check=_gpus, allowed="0, a number in [0.0001, 1] or a whole number > 1",
                     identity=False, help="GPUs per trial in sweeps (fractions share a GPU); per worker "
                                          "with resources.workers > 1")
    workers: int = _f(1, check=lambda v: 1 <= v <= MAX_WORKERS, allowed=f"an integer 1..{MAX_WORKERS}",
                      identity=False,
                      help="sweeps: data-parallel worker processes per trial (Ray Train; gloo on CPU, nccl on GPU), "
                           "each with resources.cpus and resources.gpus; 1 = the trial's own process")

    @property
    def backend(self) -> str:
        """The data-parallel workers' torch.distributed backend: nccl when they compute on their GPUs,
        gloo on CPU, also beside reserved GPUs with ``device: cpu`` (logical GPUs, no CUDA: NCCL
        refuses to start there, and torch's ``cpu:gloo,cuda:nccl`` builds NCCL too)."""
        return "nccl" if self.gpus and self.device != "cpu" else "gloo"


@dataclass
class Config:
    seed: int = _f(0, check=_non_negative, allowed="an integer >= 0")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    # ---- derived quantities (one place) ----
    @property
    def search_epoch(self) -> int:
        """Epoch of dense training the search starts from (SPEC §0 search point k)."""
        return self.search.rewind_epochs if self.search.point == "rewind" else 0

    @property
    def search_epochs(self) -> int:
        return max(1, round(self.search.length * self.training.epochs))

    @property
    def mask_lr(self) -> float:
        """Learning rate of the mask/score optimiser (search.lr, or the training LR)."""
        return self.search.lr if self.search.lr is not None else self.training.lr

    @property
    def retrain(self) -> bool:
        """Whether the ticket is retrained (resolved ``training.retrain``)."""
        if self.training.retrain is None:
            return not METHODS[self.search.method].strong
        return self.training.retrain

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def identity(self) -> dict:
        """The part of the config that decides the result."""
        return _identity(self)

    @property
    def hash(self) -> str:
        return stable_hash(self.identity())

    def dense_identity(self) -> dict:
        """What decides the dense run to the search point (shared by trials that differ only in search)."""
        ident = self.identity()
        return {"seed": ident["seed"], "data": ident["data"], "model": ident["model"],
                "training": ident["training"], "search_epoch": self.search_epoch}


SECTIONS = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig,
            "search": SearchConfig, "resources": ResourcesConfig}


def stable_hash(obj, n: int = 12) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def _identity(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = _identity(v)
        elif f.metadata.get("identity", True) == "non_default":
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if v != default:
                out[f.name] = v
        elif f.metadata.get("identity", True):
            out[f.name] = v
    return out


# ---------------------------------------------------------------- validation

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value, tp):
    """Check ``value`` against the annotated type; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = args[0]
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {value!r} is not finite; expected a finite number")
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is str and isinstance(value, bool):   # YAML 1.1 reads on/off (data.augment, data.stream) as booleans
        return "on" if value else "off"
    if tp is list and isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"{key}: {value!r} has the wrong type; expected {_type_name(tp)}")


def _build_section(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            raise unknown_key([prefix, k], 1, list(fields), f"allowed keys in {prefix}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}"
        v = _coerce(key, raw[name], hints[name])
        values[name] = v
    obj = cls(**values)
    for name, f in fields.items():
        _check_value(f"{prefix}.{name}", getattr(obj, name), f)
    return obj


def _names(choices) -> str:
    return ", ".join("null" if c is None else str(c) for c in choices)


def _check_value(key, v, f):
    choices = f.metadata.get("choices")
    if choices is not None and v not in choices:
        raise ConfigError(f"{key}: {v!r} is not allowed; choose one of: {_names(choices)}")
    check = f.metadata.get("check")
    if check is not None and v is not None and not check(v):
        raise ConfigError(f"{key}: {v!r} is out of range; expected {f.metadata.get('allowed')}")


def from_dict(raw: dict) -> Config:
    """Build and validate a Config from a (possibly partial) nested mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping with sections {', '.join(SECTIONS)}; got {type(raw).__name__}")
    top = {f.name: f for f in dataclasses.fields(Config)}
    for k in raw:
        if k not in top:
            raise unknown_key([k], 0, list(top), "allowed top-level keys")
    kwargs = {}
    for name, cls in SECTIONS.items():
        kwargs[name] = _build_section(cls, raw.get(name) or {}, name)
    if "seed" in raw:
        kwargs["seed"] = _coerce("seed", raw["seed"], int)
    cfg = Config(**kwargs)
    _check_value("seed", cfg.seed, top["seed"])
    _check_cross(cfg, milestones_given="milestones" in (raw.get("training") or {}))
    return cfg


def _check_cross(cfg: Config, milestones_given: bool = True):
    """Checks that involve more than one field."""
    t, s, d = cfg.training, cfg.search, cfg.data
    for m in t.milestones:
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            raise ConfigError(f"training.milestones: {t.milestones!r} must be a list of integers >= 0")
    late = [m for m in t.milestones if m >= t.epochs]
    if late and milestones_given:   # the default [15, 25] under a short --set training.epochs: warned below
        raise ConfigError(f"training.milestones: {late} never reached with training.epochs={t.epochs} (epochs run "
                          f"0..{t.epochs - 1}); expected milestones < {t.epochs}, e.g. [] or "
                          f"[{max(0, t.epochs * 2 // 3)}]")
    if late:
        import warnings
        warnings.warn(f"training.milestones: {late} of the default {t.milestones} never reached with "
                      f"training.epochs={t.epochs}; set training.milestones", stacklevel=3)
    if t.warmup_epochs > t.epochs:
        raise ConfigError(f"training.warmup_epochs: {t.warmup_epochs} exceeds training.epochs ({t.epochs}); "
                          f"expected 0..{t.epochs}")
    if s.point == "rewind" and s.rewind_epochs > t.epochs:
        raise ConfigError(f"search.rewind_epochs: {s.rewind_epochs} exceeds training.epochs "
                          f"({t.epochs}); expected 0..{t.epochs}")
    method = METHODS[s.method]
    if method.strong and t.retrain:
        raise ConfigError(f"training.retrain: true contradicts search.method={s.method} (a strong ticket: "
                          "weights are never trained); expected null or false")
    if s.sanity == "invert" and not method.scores:
        raise ConfigError(f"search.sanity: 'invert' needs a method that scores weights; {s.method} does not; "
                          "choose one of: none, shuffle, reinit")
    if s.method == "ltr" and s.density > 1 - s.ltr_fraction:
        raise ConfigError(f"search.density: {s.density} is above LTR's first round "
                          f"({1 - s.ltr_fraction:g}); expected a density <= {1 - s.ltr_fraction:g} for ltr")
    _check_model(cfg.model)
    _check_workers(cfg.resources, t.batch_size)
    if d.image_size is not None and d.name not in layouts.NAMES:
        raise ConfigError(f"data.image_size: applies to the folder data sets only ({', '.join(layouts.NAMES)}), "
                          f"not {d.name}; expected null")
    if d.name in layouts.NAMES:   # the user's own files: checked here, never downloaded
        if d.download:
            raise ConfigError(f"data.download: true is impossible for data.name={d.name}; expected false")
        if not d.root:
            raise ConfigError(f"data.root: required for data.name={d.name}; expected a folder holding "
                              f"{layouts.EXPECTED[d.name]}")
        layouts.check(d.name, d.root, d.image_size)
        return
    if DATASETS[d.name].needs_root:
        if not d.root:
            raise ConfigError(f"data.root: required for data.name={d.name}; "
                              "expected a folder in torchvision's layout")
        if not d.download and not Path(d.root).expanduser().is_dir():
            raise ConfigError(f"data.root: folder {d.root!r} does not exist; expected an existing "
                              "folder in torchvision's layout (or data.download: true)")
        if not d.download:   # the loader's own checks, cheap: names, headers, lengths
            check_root(d.name, d.root)


def _check_workers(r: ResourcesConfig, batch_size: int) -> None:
    """One process uses one GPU: more is data parallelism (``resources.workers``), whose workers
    each read an equal share of every global batch."""
    if r.gpus > 1:   # whole numbers only (_gpus)
        g, n = int(r.gpus), r.workers
        one = "for one process" if n == 1 else "per worker (a worker uses one)"
        raise ConfigError(f"resources.gpus: {g} GPUs {one} would leave all but one idle; set "
                          f"resources.workers: {g * n} with resources.gpus: 1 (each worker's GPUs)")
    if r.workers > 1 and 0 < r.gpus < 1:   # NCCL refuses two ranks of one group on one GPU
        raise ConfigError(f"resources.gpus: {r.gpus:g} with resources.workers: {r.workers}; each data-parallel "
                          "worker needs a GPU of its own: expected 0 (CPU, gloo) or 1")
    if batch_size % r.workers:
        raise ConfigError(f"training.batch_size: {batch_size} does not divide among resources.workers: {r.workers}; "
                          f"expected a multiple of {r.workers}, e.g. {batch_size - batch_size % r.workers or r.workers}")


def one_process(cfg: Config) -> Config:
    """``cts-ray run`` and ``api.run`` train in their own process: data-parallel workers are a sweep's
    (Ray Train starts them in a trial)."""
    if cfg.resources.workers > 1:
        raise ConfigError(f"resources.workers: {cfg.resources.workers} workers run as a sweep trial (Ray Train "
                          "starts them); cts-ray run is one process: use cts-ray sweep, or resources.workers: 1")
    return cfg


def _check_model(m: ModelConfig) -> None:
    """Model options set on a model they do not apply to are refused (one line each)."""
    if m.shortcut != "conv1x1" and m.name not in names.RESNETS:
        why = " (bottlenecks: 1x1 projections, as torchvision's and the authors')" if m.name == "resnet50" else ""
        raise ConfigError(f"model.shortcut: {m.shortcut!r} applies to ResNets only ({', '.join(sorted(names.RESNETS))}), "
                          f"not {m.name}{why}; expected conv1x1")
    if m.stem != "auto" and m.name not in names.STEMS:
        raise ConfigError(f"model.stem: {m.stem!r} applies to {' and '.join(sorted(names.STEMS))} only, not {m.name}; "
                          "expected auto")


# ---------------------------------------------------------------- loading and overrides

def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. search.density=0.01")
    key, value = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p.isidentifier() for p in parts):
        raise ConfigError(f"--set {text!r}: {key!r} is not a config key like search.density")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config mapping as {dotted key: value}, the keys ``--set`` takes."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def did_you_mean(parts: list[str], i: int, options) -> str:
    """`` did you mean KEY?``: ``parts`` with ``parts[i]`` replaced by its closest match among
    ``options`` (difflib), or nothing when none is close."""
    close = difflib.get_close_matches(str(parts[i]), [str(o) for o in options], n=1, cutoff=0.6)
    return f" did you mean {'.'.join([*map(str, parts[:i]), close[0], *map(str, parts[i + 1:])])}?" if close else ""


def unknown_key(parts: list[str], i: int, allowed, what: str) -> ConfigError:
    """``KEY: unknown key; did you mean X? WHAT: a, b, c`` (one line) for ``parts[i]`` not in ``allowed``."""
    return ConfigError(f"{'.'.join(map(str, parts))}: unknown key;{did_you_mean(parts, i, allowed)} "
                       f"{what}: {', '.join(map(str, allowed))}")


def top_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def check_key(parts: list[str], start: int = 0) -> None:
    """``parts[start:]`` (``search.density``) names a real run-config field, else a one-line
    ConfigError naming all of ``parts`` (``grid.search.density``), with a did-you-mean among the
    keys of its level."""
    top, head = top_keys(), parts[start]
    if head not in top:
        raise unknown_key(parts, start, top, "allowed top-level keys")
    if head in SECTIONS and len(parts) == start + 2:
        fields = [f.name for f in dataclasses.fields(SECTIONS[head])]
        if parts[start + 1] not in fields:
            raise unknown_key(parts, start + 1, fields, f"allowed keys in {head}")


def set_in(raw: dict, parts: list[str], value) -> None:
    check_key(parts)
    if parts[0] in SECTIONS and len(parts) != 2:
        raise ConfigError(f"{'.'.join(parts)}: expected {parts[0]}.KEY")
    if parts[0] not in SECTIONS and len(parts) != 1:
        raise ConfigError(f"{'.'.join(parts)}: {parts[0]} has no sub-keys")
    node = raw
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"{'.'.join(parts)}: {p} is not a section")
        node = node[p]
    node[parts[-1]] = value


def check_folder(key: str, path) -> None:
    """Refuse a folder path we could not create or write: it, or the nearest existing folder
    above it, must be a writable directory."""
    p = Path(path).expanduser().absolute()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        where = "is a file" if existing == p else f"is inside the file {str(existing)!r}"
        raise ConfigError(f"{key}: {str(path)!r} {where}; expected a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {str(path)!r} is not writable ({str(existing)!r}); expected a writable folder path")


def read_yaml(path, keys=None) -> dict:
    """A YAML mapping, read with the safe loader (no python/* tags); ``keys`` name what it may hold."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; expected a YAML file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or "").split())
        raise ConfigError(f"config file {str(path)!r}: malformed YAML{where}" + (f" ({problem})" if problem else "")
                          + "; expected a YAML mapping") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r}: cannot be read ({type(e).__name__}); "
                          "expected a readable UTF-8 YAML file") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r}: got a {type(raw).__name__}; expected a mapping with keys "
                          f"{', '.join(keys or SECTIONS)}")
    return raw


def load(path=None, overrides=()) -> Config:
    """Read YAML (or start from defaults), apply ``--set`` overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    apply_overrides(raw, overrides)
    return from_dict(raw)


def apply_overrides(raw: dict, overrides=()) -> None:
    """``--set KEY=VALUE`` texts written into a raw config mapping, each key checked."""
    for text in overrides:
        parts, value = parse_override(text)
        set_in(raw, parts, value)


def describe() -> list[tuple[str, Any, str, str]]:
    """(key, default, allowed, help) for every field, for the README and `cts-ray config --help`."""
    rows = [("seed", 0, "an integer >= 0", "seeds initialisation, data order, masks")]
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            allowed = (_names(choices) if choices
                       else f.metadata.get("allowed") or _type_name(typing.get_type_hints(cls)[f.name]))
            rows.append((f"{sec}.{f.name}", default, allowed, f.metadata.get("help", "")))
    return rows
