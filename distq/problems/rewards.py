"""Terminal rewards h (E6): (B, d) points -> (B,) float32 rewards, or h(y, c) of conditional runs (Algorithm 2).

`reward.fn` names a built-in (section 12) or a user function `path/to/file.py:function` / `package.module:function`.
A function with two required positional parameters, h(x, c), is conditional: it gets the points x (B, d) and their
condition values c (B,) as in the data's label column (data.condition); one with one parameter, h(x), ignores the
condition. Every reward is wrapped in `Reward`, which checks each output, so a bad reward fails with a DistqError
naming `reward.fn` instead of corrupting training.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import traceback
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from distq.errors import DistqError
from distq.problems.standardize import InUserCoordinates, Standardization
from distq.setup.config import RewardConfig

RewardFn = Callable[..., torch.Tensor]


def gmm1d_right(x: torch.Tensor) -> torch.Tensor:
    """h(x) = -|x_0 - 6| (section 12, 1D example); x: (B, d) -> (B,)."""
    return -(x[:, 0] - 6.0).abs()


SWISS_ROLL_RECTANGLE = (-15.0, 15.0, 0.0, 17.5)
"""(x0 low, x0 high, x1 low, x1 high) of the Swiss roll's rewarded rectangle (section 12)."""


def swiss_roll_rectangle(x: torch.Tensor) -> torch.Tensor:
    """h(x) = 1 if -15 <= x_0 <= 15 and 0 <= x_1 <= 17.5 else 0 (section 12); x: (B, d >= 2) -> (B,)."""
    x0_low, x0_high, x1_low, x1_high = SWISS_ROLL_RECTANGLE
    inside = (x[:, 0] >= x0_low) & (x[:, 0] <= x0_high) & (x[:, 1] >= x1_low) & (x[:, 1] <= x1_high)
    return inside.to(x.dtype)


def rewarded_region(fn: str | tuple[str, ...]) -> Optional[tuple[float, float, float, float]]:
    """The box (x0 low, x0 high, x1 low, x1 high) where `reward.fn` pays, when it is a built-in region alone."""
    return SWISS_ROLL_RECTANGLE if fn in ("swiss_roll_rectangle", ("swiss_roll_rectangle",)) else None


class LinearReward:
    """h(x) = x @ c; x: (B, d), c: (d,) -> (B,)."""

    def __init__(self, coef: tuple[float, ...]):
        self.coef = torch.tensor(coef, dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.coef.to(x)


class DigitReward:
    """h(x) = P(digit = target | x) under a multinomial logistic regression fitted on sklearn's 8x8 digits (shipped
    with scikit-learn; fitted once, deterministically, when the reward is loaded); x: (B, 64) pixel intensities."""

    def __init__(self, target: int):
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression

        digits = load_digits()
        model = LogisticRegression(max_iter=2000).fit(digits.data / 16.0, digits.target)
        self.weight = torch.tensor(model.coef_.T / 16.0, dtype=torch.float32)  # on raw intensities 0..16
        self.bias = torch.tensor(model.intercept_, dtype=torch.float32)
        self.target = target

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """P(digit = j | x) for j = 0..9; x: (B, 64) -> (B, 10)."""
        return torch.softmax(torch.addmm(self.bias.to(x), x, self.weight.to(x)), -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.probabilities(x)[:, self.target]


class OwnDigitReward(DigitReward):
    """h(x, c) = P(digit = c | x): each image scored as its own condition's digit (digits with data.condition)."""

    def __init__(self):
        super().__init__(target=0)

    def __call__(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        if condition.numel() and not (0 <= int(condition.min()) and int(condition.max()) <= 9):
            raise DistqError(f"reward.fn 'own_digit' needs condition values that are digits 0..9, got "
                             f"{sorted(set(condition.tolist()))}")
        return self.probabilities(x).gather(1, condition.long().unsqueeze(1)).squeeze(1)


def brightness(x: torch.Tensor) -> torch.Tensor:
    """Mean coordinate of each point (mean pixel intensity for images)."""
    return x.mean(-1)


BUILTINS = ("gmm1d_right", "swiss_roll_rectangle", "linear", "digit", "own_digit", "brightness")


def _where(err: BaseException) -> str:
    """' (at file:line)' of the innermost frame of an exception, unless that frame is importlib's (frozen)."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames or frames[-1].filename.startswith("<"):
        return ""
    return f" (at {frames[-1].filename}:{frames[-1].lineno})"


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}{_where(err)}"


def _takes_condition(fn: RewardFn, name: str) -> bool:
    """Whether fn is h(x, c) (two required positional parameters) rather than h(x); any other signature is refused."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature (a C function): h(x)
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p.name for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty]
    star = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in parameters)
    if len(required) == 2:
        return True
    if len(required) == 1 or (star and not required):
        return False
    raise DistqError(f"reward.fn '{name}' must take the points, h(x), or the points and their conditions, h(x, c); "
                     f"it requires {len(required)} positional arguments ({', '.join(required) or 'none'})")


class Reward:
    """A terminal reward checked on every call: (B, d) -> (B,) float32, finite. A conditional one, h(x, c), is
    called with the points' condition indices and receives their values (condition_values[index])."""

    def __init__(self, fn: RewardFn, name: str, condition_values: tuple = ()):
        self.fn = fn
        self.name = name
        self.__name__ = name
        self.conditional = _takes_condition(fn, name)
        self.values = torch.tensor(condition_values) if condition_values else None
        if self.conditional and self.values is None:
            raise self._fail("takes a condition, h(x, c), but the run is unconditional: set data.condition")

    def __call__(self, x: torch.Tensor, conditions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, d), conditions: (B,) condition indices (used by a conditional reward) -> (B,) float32."""
        inputs = (x,)
        if self.conditional:
            if conditions is None:
                raise self._fail("takes a condition, h(x, c), but was given points without their conditions")
            inputs = (x, self.values[conditions])
        try:
            out = self.fn(*inputs)
        except DistqError:
            raise
        except Exception as err:
            raise DistqError(f"reward.fn '{self.name}' raised {_describe(err)}") from err
        return self._check(out, x.shape[0])

    def _fail(self, message: str) -> DistqError:
        return DistqError(f"reward.fn '{self.name}' {message}")

    def _check(self, out: object, batch: int) -> torch.Tensor:
        """Output as a (B,) float32 tensor; (B, 1) is squeezed."""
        if isinstance(out, np.ndarray):
            if out.dtype.kind not in "biuf":
                raise self._fail(f"returned a numpy array of dtype {out.dtype}; expected numbers")
            out = torch.from_numpy(out)
        if not isinstance(out, torch.Tensor):
            raise self._fail(f"returned {type(out).__name__}; expected a torch tensor or numpy array of shape ({batch},)")
        if out.is_complex():
            raise self._fail(f"returned complex values (dtype {out.dtype})")
        out = out.to(torch.float32)
        if out.shape == (batch, 1):
            out = out.squeeze(1)
        if out.shape != (batch,):
            raise self._fail(f"returned shape {tuple(out.shape)}; expected ({batch},) for a batch of {batch} points")
        if not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).sum())
            raise self._fail(f"returned {bad} non-finite values (NaN or inf) in a batch of {batch}")
        return out


def _builtin(cfg: RewardConfig, name: str, dim: int) -> RewardFn:
    """The built-in `name` (an entry of reward.fn), checked against the data dimension d."""
    if name == "linear":
        if len(cfg.coef) != dim:
            raise DistqError(f"reward.coef has {len(cfg.coef)} entries but the data have dimension d = {dim}")
        return LinearReward(cfg.coef)
    if name == "swiss_roll_rectangle" and dim < 2:
        raise DistqError(f"reward.fn 'swiss_roll_rectangle' needs points of dimension >= 2, got d = {dim}")
    if name == "digit":
        if dim != 64:
            raise DistqError(f"reward.fn 'digit' scores 8x8 images (d = 64), but the data have dimension d = {dim}")
        return DigitReward(cfg.target)
    if name == "own_digit":
        if dim != 64:
            raise DistqError(f"reward.fn 'own_digit' scores 8x8 images (d = 64), but the data have dimension d = {dim}")
        return OwnDigitReward()
    return {"gmm1d_right": gmm1d_right, "swiss_roll_rectangle": swiss_roll_rectangle, "brightness": brightness}[name]


def _load_file_module(ref: str, target: str) -> object:
    """Execute a .py file (relative to the working directory) as a fresh module."""
    path = Path(target)
    if not path.is_file():
        raise DistqError(f"reward.fn '{ref}': file '{path}' does not exist (relative to {Path.cwd()})")
    # Not registered in sys.modules: cloudpickle then ships the function by value (e.g. to Ray workers).
    spec = importlib.util.spec_from_file_location(f"distq_user_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise DistqError(f"reward.fn '{ref}': importing '{path}' failed: {_describe(err)}") from err
    return module


def _import_module(ref: str, target: str) -> object:
    try:
        return importlib.import_module(target)
    except Exception as err:
        raise DistqError(f"reward.fn '{ref}': importing module '{target}' failed: {_describe(err)}") from err


def _user_function(ref: str) -> RewardFn:
    """Resolve `path/to/file.py:function` or `package.module:function`."""
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise DistqError(f"reward.fn '{ref}' is neither a built-in ({', '.join(BUILTINS)}) nor of the form "
                         "'path/to/file.py:function' or 'package.module:function'")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = _load_file_module(ref, target) if is_file else _import_module(ref, target)
    if not hasattr(module, attr):
        raise DistqError(f"reward.fn '{ref}': '{target}' has no attribute '{attr}'")
    fn = getattr(module, attr)
    if not callable(fn):
        raise DistqError(f"reward.fn '{ref}': '{attr}' is not callable (got {type(fn).__name__})")
    return fn


PROBE_ROWS = 8


class RewardSum:
    """h(x) = sum_i w_i h_i(x) of a list reward.fn with its reward.weights (E6 with a composite h); `parts` gives
    each h_i for the per-reward metrics. Each h_i is a checked Reward (in the user's coordinates if the data are
    standardised); h(x, c) entries get the conditions, h(x) entries ignore them."""

    def __init__(self, rewards: list, weights: tuple[float, ...], names: tuple[str, ...]):
        self.rewards, self.names = rewards, names
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.name = self.__name__ = " + ".join(f"{w:g} {name}" for w, name in zip(weights, names))
        self.conditional = any(getattr(r, "conditional", False) for r in rewards)

    def parts(self, x: torch.Tensor, conditions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, d), conditions: (B,) or None -> (B, R): h_i(x) of each listed reward."""
        return torch.stack([r(x) if conditions is None else r(x, conditions) for r in self.rewards], 1)

    def total(self, parts: torch.Tensor) -> torch.Tensor:
        """parts h_i(x) (B, R) -> (B,): sum_i w_i h_i(x), from the parts already computed."""
        return parts @ self.weights

    def __call__(self, x: torch.Tensor, conditions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, d), conditions: (B,) or None -> (B,) float32: sum_i w_i h_i(x)."""
        return self.total(self.parts(x, conditions))


def _load_one(cfg: RewardConfig, ref: str, dim: int, condition_values: tuple,
              standardization: Optional[Standardization]):
    """The checked reward named by one reference of reward.fn (in the user's coordinates if standardised)."""
    if ref in BUILTINS:
        fn = _builtin(cfg, ref, dim)
    elif ":" in ref:
        fn = _user_function(ref)
    else:
        close = difflib.get_close_matches(ref, BUILTINS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise DistqError(f"reward.fn '{ref}' is not a built-in reward ({hint}built-ins: {', '.join(BUILTINS)}) "
                         "nor a 'path/to/file.py:function' or 'package.module:function' reference")
    reward = Reward(fn, ref, condition_values)
    if standardization is not None and not standardization.identity:
        reward = InUserCoordinates(reward, standardization)
    return reward


def load_reward(cfg: RewardConfig, points: torch.Tensor, labels: Optional[torch.Tensor] = None,
                condition_values: tuple = (), standardization: Optional[Standardization] = None):
    """The checked reward named by `reward.fn` (a RewardSum if it is a list), called once on the first PROBE_ROWS
    data points (N, d) (with their condition indices `labels` (N,) in conditional runs, whose `condition_values` it
    passes to h(x, c)) so bad rewards fail early. With the data's `standardization` the points are in the model's
    coordinates z, and so is the returned reward: h(s z + m), h still seeing the user's coordinates."""
    rewards = [_load_one(cfg, ref, points.shape[1], condition_values, standardization) for ref in cfg.fns]
    reward = RewardSum(rewards, cfg.weight_values, cfg.names) if isinstance(cfg.fn, tuple) else rewards[0]
    reward(points[:PROBE_ROWS], labels[:PROBE_ROWS] if labels is not None else None)
    return reward
