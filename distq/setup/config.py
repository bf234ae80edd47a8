"""Frozen configuration dataclasses and their validation, built from nested dicts (config_from_dict).

Each section maps 1:1 onto a YAML mapping of the same name (files and `--set` overrides: distq.setup.configfile); the
dotted paths are the same ones Ray Tune sweeps. Every check raises DistqError naming the offending field and its
allowed range.

Over 300 lines: one dataclass per YAML section, each field with its one-line doc (the generated reference,
docs/configuration.md, reads them here) and its checks, and the checks across sections; a section is one screen.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from distq.setup.schema import build, fail, plain

RUN_SETTING = "run_setting"
"""Field metadata of the keys that only say how to run an experiment, not what it is: how long, on which devices,
threads, processes and workers, how often to log, checkpoint and evaluate, how the evaluation samples, tracking.
`--resume` accepts changes to them (distq.runs.checkpoint); every other key defines the experiment."""
RUN_SECTIONS = ("parallel", "tracking")
"""Sections whose every key is a run setting."""


def run_setting(default: Any) -> Any:
    """A dataclass field with `default` that is a run setting (RUN_SETTING)."""
    return field(default=default, metadata={RUN_SETTING: True})


SOURCES = ("gmm1d", "swiss_roll", "gaussian", "gmm", "digits", "file")
SCHEDULES = ("ou", "ve", "vp")
SAMPLERS = ("sde", "ode_euler", "ddim")
GENERATION_SAMPLERS = (*SAMPLERS, "heun", "dpmpp_2m")
"""heun (distq.maths.samplers.heun_step: two actions per step) and dpmpp_2m (dpmpp_2m_step: it carries the previous step's
denoised state) are for generation (distq sample, evaluation) only."""
PRECONDITIONS = ("edm", "none")
VALUE_PRIORS = ("none", "posterior_reward")
LR_SCHEDULES = ("constant", "cosine")
RATIO_METHODS = ("auto", "exact", "minibatch", "knn")
ALGORITHMS = ("qlearning", "ct_finetune", "ddpo_sf", "ddpo_is", "dpok", "dsm")
"""qlearning: Algorithm 1 (ours). The baselines of algorithm.md section 10: ct_finetune (Scores as Actions: Algorithm 1
with the pretrained policy mean of train.init in place of the ratio-estimated score), and by policy gradient on
the terminal reward alone (distq.algorithms.policy_gradient) ddpo_sf (score function), ddpo_is (clipped importance sampling) and
dpok (ddpo_sf plus a per-step KL to the pretrained policy of train.init). dsm: plain denoising score matching on
the data (distq.algorithms.dsm), a pretrainer to compare with qlearning at beta = 0; with train.beta > 0 on the data
weighted by exp(beta h) (reward-weighted regression), the no-RL yardstick for qlearning at the same tilt (E7)."""
DEVICES = ("auto", "cpu", "cuda")
"""auto: cuda if the process sees a CUDA device, else cpu (distq.setup.devices.resolve_device, when the run starts)."""
PRETRAINED_ALGORITHMS = ("ct_finetune", "dpok")
"""The algorithms that need a pretrained run (train.init) as their reference."""
Q_LEARNING_ALGORITHMS = ("qlearning", "ct_finetune")
"""The algorithms that learn a value function with little q-learning (Algorithm 1) from running rewards."""
WANDB_MODES = ("online", "offline", "disabled")
POLICY_GRADIENTS = ("td", "rao_blackwell")
"""td: the policy semi-gradient of (E16) as written. rao_blackwell: the same expectation with less variance
(distq.maths.policy.rao_blackwell_surrogate)."""


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise fail("config field", name, message)


def _positive(value: float, name: str) -> None:
    _require(value > 0 and math.isfinite(value), name, f"must be a positive finite number, got {value!r}")


def _choice(value: str, name: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, name, f"must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Training data: a built-in generator or a user file (section 12 for the built-ins)."""

    source: str = "swiss_roll"
    """gmm1d | swiss_roll | gaussian | gmm (data.components Gaussians in data.dim dimensions) | digits (sklearn's
    8x8 digits, d = 64, N = 1,797) | file."""
    n_samples: int = 300
    """Number of data points N drawn from a built-in source (ignored for `digits` and `file`)."""
    path: Optional[str] = None
    """Parquet, CSV or .npy file of numeric rows (source `file`)."""
    columns: Optional[tuple[str, ...]] = None
    """Columns of the file to use (default all)."""
    mean: tuple[float, ...] = (0.0, 0.0)
    """Mean of the `gaussian` source; its length is the dimension d."""
    std: float = 1.0
    """Per-coordinate standard deviation of the `gaussian` source and of each `gmm` component."""
    components: int = 8
    """`gmm`: number of equally weighted components, means drawn from N(0, 9 I) with the seed."""
    condition: Optional[str] = None
    """Conditional generation (Algorithm 2): `label` for a built-in's own labels (gmm1d and gmm: the component,
    swiss_roll: one of data.classes segments along the roll, digits: the digit), or for a file the name of its
    integer label column (not a data column). None: unconditional. Works with every backend (parallel.workers,
    train.processes) and ratio.method (each condition's estimator uses that condition's points only)."""
    classes: int = 3
    """swiss_roll with data.condition = label: number of equal segments of the roll's parameter."""
    dim: int = 16
    """`gmm`: dimension d."""
    standardize: Optional[bool] = None
    """Train on the columns standardised to mean 0 and spread 1 (distq.problems.standardize; samples, rewards and plots stay in
    the data's own coordinates). None (auto): on for `file` data, off for the built-ins (kept at the paper's scale)."""

    def __post_init__(self) -> None:
        _choice(self.source, "data.source", SOURCES)
        _require(self.n_samples >= 2, "data.n_samples", f"must be >= 2, got {self.n_samples}")
        _require(self.source != "file" or bool(self.path), "data.path", "is required when data.source is 'file'")
        _require(len(self.mean) >= 1, "data.mean", "must have at least one coordinate")
        _positive(self.std, "data.std")
        _require(self.columns is None or len(self.columns) > 0, "data.columns", "must list at least one column")
        _require(self.components >= 1, "data.components", f"must be >= 1, got {self.components}")
        _require(self.classes >= 1, "data.classes", f"must be >= 1, got {self.classes}")
        _require(self.condition is None or self.source == "file" or self.condition == "label", "data.condition",
                 f"must be 'label' for the built-in source {self.source!r} (or a column name for files), "
                 f"got {self.condition!r}")
        _require(self.condition is None or self.source != "gaussian", "data.condition",
                 "the gaussian source has no labels; use gmm, gmm1d, swiss_roll, digits or a file's label column")
        _require(self.condition is None or self.columns is None or self.condition not in self.columns,
                 "data.condition", "names a column also listed in data.columns")
        _require(self.dim >= 1, "data.dim", f"must be >= 1, got {self.dim}")

    @property
    def standardized(self) -> bool:
        """Whether data.standardize, resolved (auto: files only), standardises the data."""
        return self.source == "file" if self.standardize is None else self.standardize


@dataclass(frozen=True)
class RewardConfig:
    """Terminal reward h (E6): a built-in name or `path/to/file.py:function` / `package.module:function`."""

    fn: str | tuple[str, ...] = "swiss_roll_rectangle"
    """gmm1d_right | swiss_roll_rectangle | linear | digit (probability that an 8x8 image shows reward.target, by a
    logistic regression fitted on sklearn's digits) | own_digit (conditional: probability that it shows its own
    condition's digit, for digits with data.condition) | brightness (mean coordinate, for digits / 16) | a user
    function reference: h(x) or, in conditional runs, h(x, c) with the condition values c (distq.problems.rewards). A list
    of these: h is their weighted sum (reward.weights), each reported separately."""
    coef: Optional[tuple[float, ...]] = None
    """Coefficient vector c of the `linear` reward h(x) = c . x."""
    target: int = 3
    """The digit of the `digit` reward."""
    weights: Optional[tuple[float, ...]] = None
    """Weights w_i >= 0 of a list reward.fn, h = sum_i w_i h_i, one per entry (None: 1 each, the plain sum)."""

    def __post_init__(self) -> None:
        listed = isinstance(self.fn, tuple)
        _require(not listed or len(self.fn) > 0, "reward.fn", "must list at least one reward, got an empty list")
        _require(all(bool(fn) for fn in self.fns), "reward.fn", "must name a reward")
        _require("linear" not in self.fns or self.coef is not None, "reward.coef", "is required by reward.fn 'linear'")
        _require(0 <= self.target <= 9, "reward.target", f"must be a digit 0..9, got {self.target}")
        if self.weights is not None:
            _require(len(self.weights) == len(self.fns), "reward.weights",
                     f"must have one weight per reward.fn entry ({len(self.fns)}), got {len(self.weights)}")
            _require(all(w >= 0 and math.isfinite(w) for w in self.weights), "reward.weights",
                     f"must be finite numbers >= 0, got {list(self.weights)}")
            _require(any(w > 0 for w in self.weights), "reward.weights", "must not all be 0")

    @property
    def fns(self) -> tuple[str, ...]:
        """The reward references of reward.fn, one or a list."""
        return self.fn if isinstance(self.fn, tuple) else (self.fn,)

    @property
    def names(self) -> tuple[str, ...]:
        """Each reward's name in per-reward metrics: its reference, or fn0, fn1, ... if a reference repeats."""
        fns = self.fns
        return fns if len(set(fns)) == len(fns) else tuple(f"fn{i}" for i in range(len(fns)))

    @property
    def weight_values(self) -> tuple[float, ...]:
        """reward.weights, resolved (None: 1 each)."""
        return self.weights if self.weights is not None else (1.0,) * len(self.fns)


@dataclass(frozen=True)
class SDEConfig:
    """Forward noising schedule (E1-E2), horizon, time grid and sampler (E5, section 8)."""

    schedule: str = "ou"
    """ou | ve | vp."""
    T: float = 5.0
    """Horizon of the forward process."""
    dt: float = 0.25
    """T / dt must be a whole number K, the number of steps; with grid_power 1 every step has length dt."""
    grid_power: float = 1.0
    """Forward times t_k = T ((K - k) / K)^grid_power: 1 = the paper's uniform grid; > 1 = shorter steps near the
    data (t = 0), longer near the prior (distq.maths.schedules.grid_times)."""
    sampler: str = "sde"
    """sde | ode_euler | ddim."""
    beta_min: float = 0.1
    """vp only: beta(0)."""
    beta_max: float = 20.0
    """vp only: beta(T)."""

    def __post_init__(self) -> None:
        _choice(self.schedule, "sde.schedule", SCHEDULES)
        _choice(self.sampler, "sde.sampler", SAMPLERS)
        _positive(self.T, "sde.T")
        _positive(self.dt, "sde.dt")
        ratio = self.T / self.dt
        _require(abs(ratio - round(ratio)) < 1e-6 and round(ratio) >= 1, "sde.dt",
                 f"must divide sde.T={self.T} into a whole number of steps; got dt={self.dt} (T/dt = {ratio:g})")
        _positive(self.grid_power, "sde.grid_power")
        _positive(self.beta_min, "sde.beta_min")
        _require(self.beta_max >= self.beta_min, "sde.beta_max", f"must be >= sde.beta_min={self.beta_min}")

    @property
    def num_steps(self) -> int:
        """K = T / dt."""
        return int(round(self.T / self.dt))


@dataclass(frozen=True)
class RatioConfig:
    """Ratio estimator of the score (E13)."""

    method: str = "auto"
    """exact (all N points) | minibatch (a fresh random subset of ratio.minibatch points per step) | knn (the
    ratio.knn nearest points of each query) | auto (distq.maths.ratio.choose_method: minibatch if ratio.minibatch is set,
    else exact up to N = 4096 or from d = 16 on, else minibatch of 1024)."""
    eps: float = 0.0
    """The paper's lower bound: weights divide by max(sum_j p_j, N eps). 0 = plain softmax (log-sum-exp)."""
    minibatch: Optional[int] = None
    """Subset size m of the minibatch method (None: 1024 when the method is minibatch)."""
    knn: int = 64
    """Neighbours k of the knn method."""
    bandwidth: float = 0.0
    """h >= 0: score of the data smoothed by N(0, h^2 I) (a kernel density estimate): kernel variance
    sigma_t^2 + mu_t^2 h^2 in (E13); dsm then learns that smoothed law too. 0 = the paper's estimator of the
    empirical law's score."""

    def __post_init__(self) -> None:
        _choice(self.method, "ratio.method", RATIO_METHODS)
        _require(self.eps >= 0 and math.isfinite(self.eps), "ratio.eps", f"must be >= 0, got {self.eps}")
        _require(self.minibatch is None or self.minibatch >= 1, "ratio.minibatch", f"must be >= 1, got {self.minibatch}")
        _require(self.knn >= 1, "ratio.knn", f"must be >= 1, got {self.knn}")
        _require(self.bandwidth >= 0 and math.isfinite(self.bandwidth), "ratio.bandwidth",
                 f"must be >= 0, got {self.bandwidth}")
        _require(self.method != "knn" or self.eps == 0, "ratio.method",
                 "knn keeps only the nearest points, so it needs ratio.eps = 0 (the floor is over all N)")


@dataclass(frozen=True)
class ModelConfig:
    """Policy-mean and value networks (paper Table 1; preconditioning of algorithm.md section 13)."""

    hidden: int = 64
    """Width of the two hidden layers."""
    precondition: str = "edm"
    """edm: mean through a denoiser with input/skip/output scaling; none: the paper's plain network."""
    time_frequencies: int = 0
    """0: the networks see time as tau / T (the paper). F > 0: also sin and cos of F learned frequencies of tau / T
    (a learned time embedding, distq.maths.policy.TimeEmbedding), each network its own."""
    value_prior: str = "none"
    """none | posterior_reward: the value network J_phi also has the known part beta h(E[X_0 | X_t = y]), the
    terminal reward at the ratio estimator's denoised state (distq.maths.value.RewardPrior), and learns the rest. For
    rewards that are differentiable torch functions (e.g. digit); costs O(N d) per state (all N points)."""

    def __post_init__(self) -> None:
        _require(self.hidden >= 1, "model.hidden", f"must be >= 1, got {self.hidden}")
        _require(0 <= self.time_frequencies <= 64, "model.time_frequencies",
                 f"must be between 0 and 64, got {self.time_frequencies}")
        _choice(self.precondition, "model.precondition", PRECONDITIONS)
        _choice(self.value_prior, "model.value_prior", VALUE_PRIORS)


@dataclass(frozen=True)
class TrainConfig:
    """Algorithm 1: reward weight, temperature, episodes and optimisation."""

    algorithm: str = "qlearning"
    """qlearning | ct_finetune | ddpo_sf | ddpo_is | dpok | dsm (see ALGORITHMS)."""
    init: Optional[str] = None
    """A run directory whose trained policy mean starts this run (and is ct_finetune's and dpok's reference)."""
    beta: float = 0.0
    """Weight of the terminal reward beta (E6); 0 = plain score matching. dsm: the data's weights exp(beta h)."""
    temperature: float = 5.0
    """Entropy temperature theta (E8); policy covariance theta / g^2 (E10)."""
    episodes: int = run_setting(50000)
    """Number of updates; each uses a batch of fresh trajectories."""
    batch_size: int = 300
    """Trajectories per episode B."""
    chunk_size: int = 100
    """Trajectories per independent random stream; batches split across rollout workers in whole chunks."""
    threads: int = run_setting(1)
    """torch CPU threads of the training process (0 = one per core). More than 1 pays only on an otherwise idle
    machine: OpenMP threads that share a core with another busy process slow training several-fold."""
    device: str = run_setting("cpu")
    """auto | cpu | cuda: where the learner's networks, optimiser state and updates live (in the training process,
    or in the Learner actor with parallel.workers > 0, where auto means cuda only if it reserves a GPU,
    parallel.learner_num_gpus > 0). cpu by default: at paper scale the networks are too small for a GPU to pay off.
    Checkpoints are CPU tensors whatever the device, so a run resumes on any machine."""
    processes: int = run_setting(1)
    """1: Algorithm 1 in the training process. 2: the critic (ratio-estimated running rewards and the value
    network's forward, backward and Adam step) runs in a second process on another core, overlapping the rollout
    and the policy update; the numbers are the same. A speed option: where it cannot split the run (Ray rollout
    workers, the baselines and dsm, rao_blackwell, a target network, a device other than cpu) the run takes 1 and
    says so once (single_process_reason)."""
    policy_gradient: str = "td"
    """td | rao_blackwell: how qlearning and ct_finetune estimate the policy semi-gradient of (E16). rao_blackwell
    replaces its running-reward part by the exact expectation over the action noise and centres the next-state
    value at the mean action's successor: the same expected update, with a variance that does not grow with the
    dimension (what makes q-learning learn 64-dimensional digits). Runs in one process (processes taken as 1)."""
    target_rate: float = 0.0
    """> 0: a target value network, moved this fraction of the way to J_phi after every update (Polyak averaging),
    gives the next-state values of the TD errors (E15) and rao_blackwell's grad J; 0 = off (the paper: J_phi
    itself). A slowly moving target keeps the critic from chasing its own noise (64-dimensional digits).
    Runs in one process (processes taken as 1)."""
    ema_rate: float = 0.0
    """> 0: evaluate, sample and initialise other runs (train.init) with an exponential moving average of the
    policy-mean weights, moved this fraction of the way to the trained weights after every optimiser step (Polyak
    averaging, the EMA of diffusion models); rollouts during training still use the trained weights (on-policy).
    It averages out the last updates' noise. 0 = off (the paper: the trained weights)."""
    kl_weight: float = 0.01
    """dpok: weight of the per-step KL to the pretrained policy."""
    is_clip: float = 1e-4
    """ddpo_is: clip range of the importance ratio (DDPO's default 1e-4)."""
    inner_steps: int = 1
    """ddpo_is: gradient steps per batch (the first is exactly ddpo_sf's)."""
    lr_policy: float = 1e-3
    """Adam learning rate of the policy mean (psi)."""
    lr_value: float = 1e-3
    """Adam learning rate of the value network (phi)."""
    lr_schedule: str = "constant"
    """constant | cosine (decay to 0 over the episodes)."""
    grad_clip: Optional[float] = None
    """Clip each network's gradient norm to this value (None = off)."""
    log_every: int = run_setting(50)
    """Episodes between rows of metrics.parquet."""
    checkpoint_every: int = run_setting(1000)
    """Episodes between checkpoints (one is always written at the end)."""
    progress_seconds: float = run_setting(5.0)
    """Seconds between progress lines."""
    kl_budget: Optional[float] = None
    """With eval.every: keep the checkpoint of the evaluation with the most reward whose KL is within this budget
    (checkpoint_best.pt) and stop a run whose KL stays above it (train.kl_patience). None = no budget."""
    kl_patience: int = run_setting(3)
    """Consecutive evaluations with the KL above train.kl_budget that stop the run."""

    def __post_init__(self) -> None:
        _require(self.beta >= 0 and math.isfinite(self.beta), "train.beta", f"must be >= 0, got {self.beta}")
        _positive(self.temperature, "train.temperature")
        _require(self.episodes >= 1, "train.episodes", f"must be >= 1, got {self.episodes}")
        _require(self.batch_size >= 2, "train.batch_size", f"must be >= 2, got {self.batch_size}")
        _require(self.chunk_size >= 1, "train.chunk_size", f"must be >= 1, got {self.chunk_size}")
        _require(self.threads >= 0, "train.threads", f"must be >= 0, got {self.threads}")
        _require(self.processes in (1, 2), "train.processes", f"must be 1 or 2, got {self.processes}")
        _choice(self.device, "train.device", DEVICES)
        _choice(self.algorithm, "train.algorithm", ALGORITHMS)
        _require(self.algorithm not in PRETRAINED_ALGORITHMS or bool(self.init), "train.init",
                 f"is required for train.algorithm={self.algorithm}: the pretrained run to fine-tune and stay near")
        _require(self.kl_weight >= 0 and math.isfinite(self.kl_weight), "train.kl_weight", "must be >= 0")
        _positive(self.is_clip, "train.is_clip")
        _require(self.inner_steps >= 1, "train.inner_steps", f"must be >= 1, got {self.inner_steps}")
        _choice(self.policy_gradient, "train.policy_gradient", POLICY_GRADIENTS)
        _require(self.policy_gradient == "td" or self.algorithm in Q_LEARNING_ALGORITHMS,
                 "train.policy_gradient",
                 f"rao_blackwell applies to {' and '.join(Q_LEARNING_ALGORITHMS)}, not {self.algorithm}")
        _require(0 <= self.target_rate <= 1, "train.target_rate", f"must be between 0 and 1, got {self.target_rate}")
        _require(self.target_rate == 0 or self.algorithm in Q_LEARNING_ALGORITHMS, "train.target_rate",
                 f"applies to the value network of {' and '.join(Q_LEARNING_ALGORITHMS)}, not {self.algorithm}")
        _require(0 <= self.ema_rate <= 1, "train.ema_rate", f"must be between 0 and 1, got {self.ema_rate}")
        _positive(self.lr_policy, "train.lr_policy")
        _positive(self.lr_value, "train.lr_value")
        _choice(self.lr_schedule, "train.lr_schedule", LR_SCHEDULES)
        if self.grad_clip is not None:
            _positive(self.grad_clip, "train.grad_clip")
        _require(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        _require(self.checkpoint_every >= 1, "train.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        _require(self.progress_seconds >= 0, "train.progress_seconds", "must be >= 0")
        if self.kl_budget is not None:
            _positive(self.kl_budget, "train.kl_budget")
        _require(self.kl_patience >= 1, "train.kl_patience", f"must be >= 1, got {self.kl_patience}")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation (section 11): batches of generated samples against fresh data."""

    n_samples: int = run_setting(300)
    """Generated samples per batch (and data samples per reference batch)."""
    batches: int = run_setting(20)
    """Number of batches for the 95% confidence intervals (the paper uses 100)."""
    k: int = run_setting(1)
    """Neighbour index of the kNN KL estimator."""
    pca: int = 0
    """> 0: estimate the KL in the span of this many principal components of the training data (for high d,
    where kNN distances concentrate); 0: in the data's own coordinates."""
    every: int = run_setting(0)
    """Evaluate (eval.batches batches) every this many episodes during training, as eval/* columns of
    metrics.parquet; 0 = only at the end."""

    def __post_init__(self) -> None:
        _require(self.n_samples >= 3, "eval.n_samples", f"must be >= 3, got {self.n_samples}")
        _require(self.batches >= 2, "eval.batches", f"must be >= 2, got {self.batches}")
        _require(1 <= self.k < self.n_samples - 1, "eval.k", f"must be in [1, eval.n_samples - 2], got {self.k}")
        _require(self.pca >= 0, "eval.pca", f"must be >= 0, got {self.pca}")
        _require(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")


@dataclass(frozen=True)
class ParallelConfig:
    """Ray rollout actors (distq.backends.ray_actors); workers = 0 runs everything in the training process."""

    workers: int = 0
    """Number of RolloutWorker actors W (0 = in-process, no Ray)."""
    mode: str = "sync"
    """sync: exactly Algorithm 1; async: the next batch is generated while the learner updates (policy lag);
    ddp: W = parallel.workers Ray Train workers each hold the networks and roll out and differentiate their share
    of the batch, gradients are summed over them and every replica takes the same step (distq.backends.data_parallel)."""
    num_cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each RolloutWorker (ddp: for each Ray Train worker)."""
    num_gpus_per_worker: float = 0.0
    """GPUs Ray reserves for each RolloutWorker (ddp: > 0 puts each Ray Train worker on a GPU, all-reducing over nccl)."""
    learner_num_cpus: float = 1.0
    """CPUs Ray reserves for the Learner actor."""
    learner_num_gpus: float = 0.0
    """GPUs Ray reserves for the Learner actor (put it on a GPU node)."""
    rollout_device: str = "cpu"
    """auto | cpu | cuda: where rollouts compute (the RolloutWorker actors, or the training process with workers = 0)
    and where the run is evaluated and `distq sample` generates. In an actor, auto means cuda only if the actor
    reserves a GPU (parallel.num_gpus_per_worker > 0)."""
    memory_per_worker_mb: Optional[float] = None
    """MiB of memory Ray reserves for each RolloutWorker (None: no reservation). Ray places actors so that the
    reservations on a node fit its memory; it does not cap what an actor uses."""
    learner_memory_mb: Optional[float] = None
    """MiB of memory Ray reserves for the Learner actor (None: no reservation)."""
    ray_num_cpus: Optional[int] = None
    """CPUs of an embedded Ray instance (None = all of this machine's)."""
    max_failures: int = 3
    """ddp: worker failures Ray Train recovers from (every worker restarts from the last checkpoint) before the
    run stops; -1 = no limit."""
    connect_timeout_s: float = 60.0
    """Seconds to wait for a Ray cluster to answer at --address, and for the actors to be placed and built, before
    stopping with what was asked and what the cluster has."""

    def __post_init__(self) -> None:
        _require(self.workers >= 0, "parallel.workers", f"must be >= 0, got {self.workers}")
        _choice(self.mode, "parallel.mode", ("sync", "async", "ddp"))
        _require(self.mode != "ddp" or self.workers >= 1, "parallel.mode",
                 "ddp needs parallel.workers >= 1 (the number of Ray Train workers)")
        _require(self.max_failures >= -1, "parallel.max_failures", f"must be >= -1, got {self.max_failures}")
        for name in ("num_cpus_per_worker", "num_gpus_per_worker", "learner_num_cpus", "learner_num_gpus"):
            value = getattr(self, name)
            _require(value >= 0 and math.isfinite(value), f"parallel.{name}", f"must be >= 0, got {value}")
        _require(self.ray_num_cpus is None or self.ray_num_cpus >= 1, "parallel.ray_num_cpus", "must be >= 1")
        _positive(self.connect_timeout_s, "parallel.connect_timeout_s")
        _choice(self.rollout_device, "parallel.rollout_device", DEVICES)
        for name in ("memory_per_worker_mb", "learner_memory_mb"):
            value = getattr(self, name)
            if value is not None:
                _positive(value, f"parallel.{name}")


@dataclass(frozen=True)
class TrackingConfig:
    """Weights & Biases: one run per `distq train` (inside a sweep: one per trial, one group per sweep)."""

    wandb: bool = True
    """Log to W&B: the config, every metrics row, the plots and the summary."""
    project: str = "distq"
    """W&B project."""
    group: Optional[str] = None
    """W&B group (sweeps: default the sweep's name)."""
    entity: Optional[str] = None
    """W&B entity (default: the API key's user)."""
    mode: Optional[str] = None
    """online | offline | disabled; None: WANDB_MODE if set, else online with WANDB_API_KEY and offline without."""

    def __post_init__(self) -> None:
        _require(bool(self.project), "tracking.project", "must not be empty")
        if self.mode is not None:
            _choice(self.mode, "tracking.mode", WANDB_MODES)


@dataclass(frozen=True)
class Config:
    """A whole training run."""

    seed: int = 0
    """Seed of data generation, initialisation and every random draw."""
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sde: SDEConfig = field(default_factory=SDEConfig)
    ratio: RatioConfig = field(default_factory=RatioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _require(self.train.kl_budget is None or self.eval.every > 0, "train.kl_budget",
                 "needs eval.every > 0: the budget is checked at the evaluations during training")
        chunks = -(-self.train.batch_size // self.train.chunk_size)
        _require(self.parallel.workers <= chunks, "parallel.workers",
                 f"must be <= the {chunks} chunks of a batch (train.batch_size / train.chunk_size); more would idle")
        if self.parallel.mode == "ddp":
            # the loop runs in the Ray Train workers; evaluating there during training is not built
            _require(self.eval.every == 0, "eval.every",
                     "evaluations during training are not available with parallel.mode ddp yet; use sync or async")
            _require(self.train.algorithm in Q_LEARNING_ALGORITHMS + ("dsm",), "parallel.mode",
                     f"ddp trains {', '.join(Q_LEARNING_ALGORITHMS)} and dsm, not {self.train.algorithm}")
            _require(self.train.device == self.parallel.rollout_device, "parallel.mode",
                     "ddp: each worker rolls out and updates on one device; set train.device and "
                     "parallel.rollout_device alike")
        if self.parallel.workers:  # an actor computing on a GPU it has not reserved would share it unaccounted
            _require(self.train.device != "cuda" or self.parallel.learner_num_gpus > 0 or self.parallel.mode == "ddp",
                     "train.device", "is cuda: the Learner actor must reserve a GPU (parallel.learner_num_gpus > 0)")
            _require(self.parallel.rollout_device != "cuda" or self.parallel.num_gpus_per_worker > 0,
                     "parallel.rollout_device", "is cuda: the RolloutWorker actors (ddp: the workers) must reserve a "
                     "GPU (parallel.num_gpus_per_worker > 0)")
        dims = {"gaussian": (len(self.data.mean), "data.mean has"), "gmm": (self.data.dim, "data.dim is"),
                "digits": (64, "digits have"), "swiss_roll": (2, "swiss_roll has"), "gmm1d": (1, "gmm1d has")}
        if "linear" in self.reward.fns and self.data.source in dims:
            dim, what = dims[self.data.source]
            _require(len(self.reward.coef) == dim, "reward.coef", f"has {len(self.reward.coef)} entries but {what} {dim}")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists instead of tuples), ready for YAML."""
        return plain(dataclasses.asdict(self))


def single_process_reason(config: Config) -> Optional[str]:
    """Why train.processes = 2 cannot split this run (the run then takes 1), or None if it can (or processes is 1).

    processes = 2 moves the critic of qlearning's in-process update to a second CPU process with the same numbers;
    it is a speed option, so a run it cannot serve still runs, in one process (distq.training.trainer says so once).
    """
    train, parallel = config.train, config.parallel
    if train.processes == 1:
        return None
    if parallel.workers:
        return f"with parallel.workers={parallel.workers} the learner runs in one Ray actor"
    if train.algorithm != "qlearning":
        return f"the critic process computes qlearning's ratio rewards, not train.algorithm={train.algorithm}'s update"
    if train.policy_gradient != "td":
        return f"train.policy_gradient={train.policy_gradient} needs the ratio scores the critic process keeps"
    if train.target_rate:
        return f"train.target_rate={train.target_rate:g} needs a target network the critic process does not have"
    if not train.device == parallel.rollout_device == "cpu":
        return (f"train.device={train.device} and parallel.rollout_device={parallel.rollout_device}: the two "
                "processes compute on the CPU")
    return None


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (the YAML layout)."""
    return build(Config, values, "", "config field")


def run_settings() -> tuple[str, ...]:
    """The dotted keys that only say how to run (RUN_SETTING, RUN_SECTIONS): those --resume may change."""
    keys = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory if section.default_factory is not dataclasses.MISSING else None
        if cls is None or not dataclasses.is_dataclass(cls):
            continue
        keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls)
                 if section.name in RUN_SECTIONS or f.metadata.get(RUN_SETTING)]
    return tuple(keys)
