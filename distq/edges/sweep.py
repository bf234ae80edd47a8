"""Sweep files (`tuning/*.yaml`): a training config, a search space over its dotted paths, and the objective.

Everything is checked here, before Ray starts: every path against the Config dataclasses, every value of a grid
and both ends of every range by building the training config they give. No Ray in this module.

    base: ../configs/swiss_roll.yaml        # relative to the sweep file
    overrides: {train.episodes: 3000}       # dotted paths, the same ones `--set` takes
    search_space: {train.beta: {grid: [0, 1, 2]}, train.lr_policy: {loguniform: [1.0e-4, 1.0e-2]}}
    search: {algorithm: random, num_samples: 8, metric: kl_mean, mode: min, reward_target: 0.8}
    scheduler: {name: asha, grace_period: 1000}
    report_every: 500
    resources: {cpu: 1}
    tracking: {wandb: true, project: distq}

Over 300 lines: the sweep file's whole format: its sections, their checks (each naming the offending key) and
the search space built from them, which the generated docs and the error messages must keep in step.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from distq.errors import DistqError
from distq.setup.config import Config, TrackingConfig, config_from_dict
from distq.setup.configfile import read_yaml
from distq.setup.schema import base_type, build, coerce, fail, flatten, unknown

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
ALGORITHMS = ("random", "grid", "optuna")
METRICS = ("kl_mean", "reward_mean")
SCHEDULERS = ("asha", "none")
KIND = "sweep field"
PENALTY = 10.0
"""Constrained objectives: KL plus PENALTY per unit of mean reward below the target, or reward minus PENALTY per
unit of KL over the budget (what ASHA and TPE see)."""


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise fail(KIND, name, message)


@dataclass(frozen=True)
class SearchConfig:
    """How trials are proposed and what they optimise."""

    algorithm: str = "random"
    """random (Tune's variant generator; grids are crossed with the random draws) | grid | optuna (TPE)."""
    num_samples: int = 1
    """Random draws (grid: repetitions of the whole grid; optuna: trials)."""
    metric: str = "kl_mean"
    """kl_mean | reward_mean of each trial's evaluation."""
    mode: Optional[str] = None
    """min | max (default: min for kl_mean, max for reward_mean)."""
    reward_target: Optional[float] = None
    """Minimise KL subject to reward_mean >= reward_target (needs metric kl_mean, mode min)."""
    kl_budget: Optional[float] = None
    """Maximise reward subject to kl_mean <= kl_budget (needs metric reward_mean, mode max): the mirror of
    reward_target."""
    seed: int = 0
    """Seed of the random and TPE proposals."""

    def __post_init__(self) -> None:
        _require(self.algorithm in ALGORITHMS, "search.algorithm", f"must be one of {', '.join(ALGORITHMS)}; "
                                                                   f"got {self.algorithm!r}")
        _require(self.num_samples >= 1, "search.num_samples", f"must be >= 1, got {self.num_samples}")
        _require(self.metric in METRICS, "search.metric", f"must be one of {', '.join(METRICS)}; got {self.metric!r}")
        if self.mode is None:
            object.__setattr__(self, "mode", "min" if self.metric == "kl_mean" else "max")
        _require(self.mode in ("min", "max"), "search.mode", f"must be min or max; got {self.mode!r}")
        if self.reward_target is not None:
            _require(math.isfinite(self.reward_target), "search.reward_target", "must be a finite number")
            _require(self.metric == "kl_mean" and self.mode == "min", "search.reward_target",
                     "needs search.metric kl_mean and search.mode min (minimise KL subject to the reward)")
        if self.kl_budget is not None:
            _require(self.kl_budget > 0 and math.isfinite(self.kl_budget), "search.kl_budget",
                     f"must be a positive number, got {self.kl_budget}")
            _require(self.metric == "reward_mean" and self.mode == "max", "search.kl_budget",
                     "needs search.metric reward_mean and search.mode max (maximise reward subject to the KL)")


@dataclass(frozen=True)
class SchedulerConfig:
    """Early stopping of trials on the objective."""

    name: str = "none"
    """asha | none."""
    grace_period: Optional[int] = None
    """ASHA: episodes every trial runs before it can be stopped (default: report_every)."""
    reduction_factor: float = 3.0
    """ASHA: 1 / the fraction of trials kept at each rung."""

    def __post_init__(self) -> None:
        _require(self.name in SCHEDULERS, "scheduler.name", f"must be asha or none; got {self.name!r}")
        _require(self.grace_period is None or self.grace_period >= 1, "scheduler.grace_period", "must be >= 1")
        _require(self.reduction_factor > 1, "scheduler.reduction_factor", f"must be > 1, got {self.reduction_factor}")


@dataclass(frozen=True)
class ResourcesConfig:
    """What one trial's training process reserves (Ray actors of parallel.workers > 0 come on top)."""

    cpu: float = 1.0
    """CPUs of the trial process."""
    gpu: float = 0.0
    """GPUs of the trial process."""

    def __post_init__(self) -> None:
        _require(self.cpu > 0 and math.isfinite(self.cpu), "resources.cpu", f"must be > 0, got {self.cpu}")
        _require(self.gpu >= 0 and math.isfinite(self.gpu), "resources.gpu", f"must be >= 0, got {self.gpu}")


@dataclass(frozen=True)
class Dimension:
    """One searched config path: `kind` is one of DISTRIBUTIONS, `values` its list or its [low, high]."""

    path: str
    kind: str
    values: tuple


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file."""

    name: str
    base: dict[str, Any]
    """The training config of every trial before the search space is applied, flat: dotted path -> value."""
    search_space: tuple[Dimension, ...]
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    report_every: int = 500
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: str = "runs/tune"

    @property
    def episodes(self) -> int:
        return int(self.base["train.episodes"])

    def objective(self, metrics: dict[str, float]) -> float:
        """The number Tune optimises: the metric, or KL + PENALTY * shortfall below reward_target, or reward -
        PENALTY * excess over kl_budget."""
        target, budget = self.search.reward_target, self.search.kl_budget
        if target is not None:
            return float(metrics["kl_mean"]) + PENALTY * max(0.0, target - float(metrics["reward_mean"]))
        if budget is not None:
            return float(metrics["reward_mean"]) - PENALTY * max(0.0, float(metrics["kl_mean"]) - budget)
        return float(metrics[self.search.metric])


TOP_LEVEL = ("name", "base", "overrides", "search_space", "search", "scheduler", "report_every", "resources",
             "tracking", "storage")
_SECTIONS = {"search": SearchConfig, "scheduler": SchedulerConfig, "resources": ResourcesConfig,
             "tracking": TrackingConfig}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{dotted path: value} -> nested config dict; numpy scalars (as Tune draws them) become Python numbers."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        *sections, key = path.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value.item() if hasattr(value, "item") and not isinstance(value, (list, tuple)) else value
    return nested


def config_from_flat(flat: dict[str, Any]) -> Config:
    """A trial's training config from its flat Tune config."""
    return config_from_dict(unflatten(flat))


def field_type(path: str) -> Any:
    """The type hint of the Config field at a dotted path; DistqError with a 'did you mean' if there is none."""
    cls, parts = Config, path.split(".")
    for depth, part in enumerate(parts):
        names = tuple(f.name for f in dataclasses.fields(cls))
        prefix = ".".join(parts[:depth])
        if part not in names:
            raise unknown(path, tuple(f"{prefix}.{n}" if prefix else n for n in names), "config path")
        hint = typing.get_type_hints(cls)[part]
        if dataclasses.is_dataclass(hint):
            if depth == len(parts) - 1:
                raise DistqError(f"config path '{path}' names a section; give one of its keys, e.g. "
                                 f"'{path}.{dataclasses.fields(hint)[0].name}'")
            cls = hint
        elif depth < len(parts) - 1:
            raise DistqError(f"config path '{path}': '{'.'.join(parts[:depth + 1])}' is a value, not a section")
    return hint


def _check_value(base: dict[str, Any], path: str, value: Any, name: str) -> Any:
    """The value as the training config stores it, after building the config it gives (lists stay lists)."""
    try:
        config = config_from_flat({**base, path: value})
    except DistqError as err:
        raise DistqError(f"sweep field '{name}': value {value!r} gives an invalid training config: {err}") from None
    return flatten(config.to_dict())[path]


def _dimension(path: str, spec: Any, base: dict[str, Any]) -> Dimension:
    """One search_space entry, e.g. `train.beta: {grid: [0, 1]}`, checked against the Config field it names."""
    name = f"search_space.{path}"
    try:
        hint = base_type(field_type(path))
    except DistqError as err:
        raise DistqError(f"sweep field '{name}': {err}") from None
    _require(isinstance(spec, dict) and len(spec) == 1, name,
             f"must be a mapping with one distribution ({', '.join(DISTRIBUTIONS)}), e.g. {{grid: [0, 1]}}; "
             f"got {spec!r}")
    ((kind, values),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise unknown(str(kind), DISTRIBUTIONS, f"distribution of sweep field '{name}':")
    _require(isinstance(values, list) and len(values) > 0, name, f"{kind} needs a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        return Dimension(path, kind, tuple(_check_value(base, path, v, name) for v in values))
    _require(len(values) == 2, name, f"{kind} needs [low, high], got {values!r}")
    wanted = int if kind == "randint" else float
    _require(hint is wanted, name, f"{kind} needs a {wanted.__name__} field, but '{path}' holds {hint}; "
                                   "use grid or choice")
    low, high = (coerce(v, wanted, name, KIND) for v in values)
    _require(low < high, name, f"{kind} range [{low}, {high}] is empty: low must be < high")
    _require(kind != "loguniform" or low > 0, name, f"loguniform needs low > 0, got {low}")
    for value in (low, high - 1 if kind == "randint" else high):
        _check_value(base, path, value, name)
    return Dimension(path, kind, (low, high))


def _local_paths(flat: dict[str, Any]) -> dict[str, Any]:
    """Trials run in their own directories (and maybe on other machines): make file paths absolute."""
    flat = dict(flat)
    if flat.get("data.path") and Path(flat["data.path"]).exists():
        flat["data.path"] = str(Path(flat["data.path"]).resolve())
    fn = flat.get("reward.fn")
    if isinstance(fn, list):
        flat["reward.fn"] = [_local_reference(str(ref)) for ref in fn]
    elif fn is not None:
        flat["reward.fn"] = _local_reference(str(fn))
    return flat


def _local_reference(ref: str) -> str:
    """`file.py:function` with an existing file made absolute; other references as they are."""
    file, sep, function = ref.rpartition(":")
    return f"{Path(file).resolve()}:{function}" if sep and file.endswith(".py") and Path(file).is_file() else ref


def _base(values: dict[str, Any], sweep_path: Path) -> dict[str, Any]:
    """The flat training config: the base file (relative to the sweep file), then the overrides."""
    base = values.get("base")
    nested = {}
    if base is not None:
        _require(isinstance(base, str), "base", f"must be a path to a training config, got {base!r}")
        nested = read_yaml(sweep_path.parent / base)
    overrides = values.get("overrides") or {}
    _require(isinstance(overrides, dict), "overrides", f"must be a mapping of dotted paths, got {overrides!r}")
    flat = flatten(nested)
    for path, value in overrides.items():
        try:
            field_type(str(path))
        except DistqError as err:
            raise DistqError(f"sweep field 'overrides.{path}': {err}") from None
        flat[str(path)] = value
    try:
        config = config_from_flat(flat)
    except DistqError as err:
        raise DistqError(f"sweep fields 'base' and 'overrides' give an invalid training config: {err}") from None
    return _local_paths(flatten(config.to_dict()))


def _check_plan(sweep: Sweep) -> None:
    """Cross-field rules: algorithm vs distributions, ASHA vs episodes, cosine schedules vs reporting."""
    kinds = {d.path: d.kind for d in sweep.search_space}
    if sweep.search.algorithm == "grid":
        for path, kind in kinds.items():
            _require(kind == "grid", f"search_space.{path}", f"is {kind}, but search.algorithm grid needs grid lists")
    if sweep.search.algorithm == "optuna":
        _require(bool(kinds), "search_space", "must not be empty with search.algorithm optuna")
        for path, kind in kinds.items():
            _require(kind != "grid", f"search_space.{path}", "is a grid, which search.algorithm optuna cannot "
                                                             "search; use choice")
    grace = sweep.scheduler.grace_period
    _require(grace is None or grace <= sweep.episodes, "scheduler.grace_period",
             f"must be <= train.episodes = {sweep.episodes}, got {grace}")
    schedules = {sweep.base["train.lr_schedule"]}
    schedules |= {v for d in sweep.search_space if d.path == "train.lr_schedule" for v in d.values}
    _require("cosine" not in schedules or sweep.report_every >= sweep.episodes, "report_every",
             f"must be >= train.episodes = {sweep.episodes} with train.lr_schedule cosine: trials stop and continue "
             "at every report, and a continued cosine schedule restarts its decay")


def load_sweep(path: str | Path, num_samples: Optional[int] = None, storage: Optional[str] = None) -> Sweep:
    """Read and check a sweep file; DistqError naming the file and the field. `num_samples`, `storage` override."""
    path = Path(path)
    values = read_yaml(path)
    try:
        for key in values:
            if key not in TOP_LEVEL:
                raise unknown(str(key), TOP_LEVEL, "sweep key")
        base = _base(values, path)
        space = values.get("search_space") or {}
        _require(isinstance(space, dict), "search_space", f"must be a mapping of dotted paths, got {space!r}")
        sections = {key: build(cls, values.get(key), key, KIND) for key, cls in _SECTIONS.items()}
        if num_samples is not None:
            sections["search"] = dataclasses.replace(sections["search"], num_samples=num_samples)
        report_every = coerce(values.get("report_every", 500), int, "report_every", KIND)
        _require(report_every >= 1, "report_every", f"must be >= 1, got {report_every}")
        name = coerce(values.get("name", path.stem), str, "name", KIND)
        _require(bool(name) and "/" not in name and name not in (".", ".."), "name",
                 f"must be a plain directory name, got {name!r}")
        sweep = Sweep(name=name, base=base, search_space=tuple(_dimension(str(p), s, base) for p, s in space.items()),
                      report_every=report_every, storage=storage or coerce(values.get("storage", "runs/tune"),
                                                                           str, "storage", KIND), **sections)
        _check_plan(sweep)
    except DistqError as err:
        raise DistqError(f"sweep file {path}: {err}") from None
    return sweep
