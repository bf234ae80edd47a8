"""Step 1 of Algorithm 1: batches of controlled reverse trajectories with ratio-estimated running rewards.

No gradients flow here; the output is a plain `Trajectories` record, so a rollout can run in another process
(a Ray actor) and hand its batch to the learner. Randomness is counter-based: a batch is made of chunks, each
with its own seed derived from (seed, episode, chunk index), so a batch is the same however its chunks are
spread over workers, and resuming at an episode needs no saved generator state. The draws are made on the CPU and
moved to the rollout's device, so every device sees the same numbers; terminal rewards are computed on the CPU.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from distq.algorithms.batch import Chunk, Trajectories
from distq.algorithms.dsm import DataTilt, data_rows, noised_data
from distq.maths.policy import REFERENCE, PolicyMean, StepMeans, action_std
from distq.maths.ratio import RatioEstimator, running_reward, smoothed_variance
from distq.maths.samplers import SAMPLERS, is_stochastic, reverse_process
from distq.maths.schedules import TimeGrid
from distq.setup.devices import CPU, to_device


class Rollout:
    """Generates training trajectories (with exploration) and evaluation samples (mean actions)."""

    def __init__(self, policy: PolicyMean, grid: TimeGrid, sampler: str, ratio: RatioEstimator,
                 terminal_reward: Callable[[torch.Tensor], torch.Tensor], temperature: float, prior_std: float,
                 running_rewards: bool = True, reference: Optional[PolicyMean] = None,
                 labels: Optional[torch.Tensor] = None, device: torch.device = CPU, rao_blackwell: bool = False):
        """running_rewards: whether `run` computes r_hat (E14) by default (the policy-gradient baselines use h(Y_K)
        alone). reference: a pretrained policy mean whose output replaces the ratio-estimated score in r_hat
        (ct_finetune, Scores as Actions). labels: the data's condition indices (N,) of a conditional run
        (Algorithm 2): each trajectory draws its condition from their shares, and its ratio score (E13) uses only
        the data of that condition. device: where the rollout computes; the networks (a policy shared with a learner
        must be there already), grid and labels are moved there, the ratio estimator's data must be there.
        rao_blackwell: batches carry what train.policy_gradient = rao_blackwell needs (see Trajectories)."""
        self.device, self.sampler, self.ratio = device, sampler, ratio
        self.policy, self.reference = to_device(policy, device), to_device(reference, device)
        self.grid = to_device(grid, device)
        self.with_running_rewards, self.rao_blackwell = running_rewards, rao_blackwell
        self.class_ratios, self.class_probs = None, None
        if labels is not None:
            # the shares stay on the CPU, with the generators that draw from them
            self.class_probs = torch.bincount(to_device(labels, CPU), minlength=policy.classes).float() / labels.shape[0]
            self.class_ratios = ratio.per_condition(to_device(labels, device), policy.classes)
        self.terminal_reward, self.temperature, self.prior_std = terminal_reward, temperature, prior_std
        self.dim = ratio.data.shape[1]
        self._coefficients = self._step_coefficients(self.grid)

    def _step_coefficients(self, grid: TimeGrid) -> dict[str, torch.Tensor]:
        """The preconditioner's coefficients at the grid steps, (K, .) (they depend on tau only, not on the weights)."""
        with torch.inference_mode():
            return self.policy.pre.coefficients(grid.tau[: grid.num_steps])

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load the learner's policy-mean weights (Learner.policy_weights; the reference's too, if broadcast)."""
        own = {k: v for k, v in weights.items() if not k.startswith(REFERENCE)}
        if self.reference is not None and len(own) < len(weights):
            self.reference.load_state_dict({k[len(REFERENCE):]: v for k, v in weights.items() if k.startswith(REFERENCE)})
        self.policy.load_state_dict(own)
        self._coefficients = self._step_coefficients(self.grid)

    def _noise(self, chunks: Sequence[Chunk]) -> dict[str, torch.Tensor]:
        """All random draws of a batch, chunk by chunk in a fixed order: start, actions, steps, data subsets,
        conditions. Subsets: per chunk, per step, one per ratio estimator (the data's, or each condition's)."""
        K, d = self.grid.num_steps, self.dim
        draws: dict[str, list] = {"start": [], "action": [], "step": [], "subsets": []}
        estimators = self.class_ratios or [self.ratio]
        for seed, size in chunks:
            gen = torch.Generator().manual_seed(seed)
            draws["start"].append(torch.randn(size, d, generator=gen))
            draws["action"].append(torch.randn(K, size, d, generator=gen))
            if is_stochastic(self.sampler):
                draws["step"].append(torch.randn(K, size, d, generator=gen))
            if any(e.minibatch is not None for e in estimators):
                draws["subsets"].append([[e.subset(gen) for e in estimators] for _ in range(K)])
            if self.class_probs is not None:  # drawn last: unconditional runs keep their streams
                draws.setdefault("conditions", []).append(self.draw_conditions(size, gen))
        noise = {key: torch.cat(draws[key], dim=0 if key == "start" else 1) for key in ("start", "action", "step")
                 if draws[key]}
        noise["subsets"] = draws["subsets"]
        noise["conditions"] = torch.cat(draws["conditions"]) if "conditions" in draws else None
        return to_device(noise, self.device)

    def draw_conditions(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n condition indices (n,) in the data's proportions (Algorithm 2's episode conditions)."""
        if self.class_probs is None:
            raise ValueError("this rollout has no condition labels: give the conditions")
        return torch.multinomial(self.class_probs, n, replacement=True, generator=generator)

    def ratio_score(self, y: torch.Tensor, k: int, chunks: Sequence[Chunk], subsets: list,
                    conditions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """s_hat (E13) at the states y (B, d) of grid step k of the batch of `chunks`, with that batch's data
        `subsets` ([] without minibatches); in conditional runs each row with its condition's (B,) own data -> (B, d)."""
        mu, sigma2 = float(self.grid.mu[k]), float(self.grid.sigma2[k])
        if conditions is None and not subsets:
            return self.ratio.score(y, mu, sigma2)
        estimators = self.class_ratios or [self.ratio]
        # a minibatch belongs to its chunk (so workers draw it alike): score chunk by chunk, else the batch at once
        bounds = np.cumsum([0] + [size for _, size in chunks]) if subsets else [0, y.shape[0]]
        score = torch.empty_like(y)
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            for c, estimator in enumerate(estimators):
                rows = torch.arange(a, b, device=y.device)
                if conditions is not None:
                    rows = rows[conditions[a:b] == c]
                if rows.numel():
                    score[rows] = estimator.score(y[rows], mu, sigma2, subsets[i][k][c] if subsets else None)
        return score

    @torch.inference_mode()
    def run(self, chunks: Sequence[Chunk], rewards: Optional[bool] = None,
            on_state: Optional[Callable[[int, torch.Tensor], None]] = None) -> Trajectories:
        """Algorithm 1 step 1 for the trajectories of `chunks`: a_k ~ pi_psi (E10), a step (E5), and r_hat_k (E14)
        if `rewards` (default: as built) is True, else running_rewards is None (another process computes them, or
        the algorithm needs none).
        on_state(k, Y_k) sees each state as soon as it is drawn."""
        grid, K = self.grid, self.grid.num_steps
        noise = self._noise(chunks)
        y = noise["start"] * self.prior_std
        batch = y.shape[0]
        states = y.new_empty(K, batch, self.dim)
        actions = y.new_empty(K, batch, self.dim)
        stds = action_std(grid.g2, self.temperature).tolist()
        step = SAMPLERS[self.sampler]
        conditions = noise["conditions"]
        mean = StepMeans(self.policy, self._coefficients, conditions)
        successors = y.new_empty(K, batch, self.dim) if self.rao_blackwell else None
        for k in range(K):
            states[k] = y
            if on_state is not None:
                on_state(k, y)
            step_noise = noise["step"][k] if "step" in noise else None
            action = mean(k, y)
            if successors is not None:
                successors[k] = step(grid, k, y, action, step_noise)
            action = action.add_(noise["action"][k], alpha=stds[k])
            actions[k] = action
            y = step(grid, k, y, action, step_noise)
        if rewards is None:
            rewards = self.with_running_rewards
        terminal, parts = self.terminal_rewards_by_part(y, conditions)
        trajectories = Trajectories(states, actions, None, y, terminal, conditions, terminal_reward_parts=parts)
        if rewards:
            scores = self.step_scores(states, chunks, noise["subsets"], conditions)
            trajectories.running_rewards = self.rewards_from_scores(scores, actions)
            if successors is not None:
                trajectories.ratio_scores, trajectories.mean_successors = scores, successors
                trajectories.mean_terminal_rewards = self.terminal_rewards(successors[-1], conditions)
        return trajectories

    @torch.inference_mode()
    def step_scores(self, states: torch.Tensor, chunks: Sequence[Chunk], subsets: list,
                    conditions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The scores of r_hat_k (E14) at the states (K, B, d) of the batch of `chunks` (and conditions) -> (K, B, d):
        s_hat (E13), or with a pretrained reference its mean."""
        steps = range(self.grid.num_steps)
        if self.reference is not None:
            means = StepMeans(self.reference, self.reference.pre.coefficients(self.grid.tau), conditions)
            return torch.stack([means(k, states[k]) for k in steps])
        return torch.stack([self.ratio_score(states[k], k, chunks, subsets, conditions) for k in steps])

    def terminal_rewards(self, y: torch.Tensor, conditions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h(Y_K) (B,), or h(Y_K, c) with the trajectories' condition indices (B,), computed on the CPU."""
        return self.terminal_rewards_by_part(y, conditions)[0]

    def terminal_rewards_by_part(self, y: torch.Tensor, conditions: Optional[torch.Tensor] = None
                                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """terminal_rewards (B,) and, for a list reward.fn (distq.problems.rewards.RewardSum), each h_i(Y_K) (B, R), the sum
        formed from them: each reward is evaluated once. None for a single reward."""
        inputs = to_device((y,) if conditions is None else (y, conditions), CPU)
        if not hasattr(self.terminal_reward, "parts"):
            return to_device(self.terminal_reward(*inputs), self.device), None
        parts = self.terminal_reward.parts(*inputs)
        return to_device((self.terminal_reward.total(parts), parts), self.device)

    def rewards_from_scores(self, scores: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(E14) for all steps at once, scores and actions (K, B, d) -> (K, B): one pass instead of K small ones."""
        return running_reward(scores, actions, self.grid.g2.unsqueeze(1))

    def ratio_draws(self, chunks: Sequence[Chunk]) -> tuple[list, Optional[torch.Tensor]]:
        """The data subsets ([] without minibatches) and condition indices (None if unconditional) of the batch of
        `chunks`, as `run` draws them: what ratio_score needs beside the states."""
        if not (self.class_probs is not None or self.ratio.minibatch is not None):
            return [], None
        noise = self._noise(chunks)
        return noise["subsets"], noise["conditions"]

    @torch.inference_mode()
    def generate(self, n: int, generator: torch.Generator, grid: Optional[TimeGrid] = None,
                 sampler: Optional[str] = None, conditions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """n samples (n, d), on the CPU, from the reverse process driven by the mean action mu_psi (section 5), with
        `sampler` (default: the run's; or heun or dpmpp_2m, for generation only),
        generated on the rollout's device; a conditional policy needs the samples' condition indices (n,)
        (draw_conditions draws them in the data's shares)."""
        if grid is None:
            grid, coefficients = self.grid, self._coefficients
        else:
            grid = to_device(grid, self.device)
            coefficients = self._step_coefficients(grid)
        sampler = sampler or self.sampler
        if self.policy.classes and conditions is None:
            conditions = self.draw_conditions(n, generator)
        mean = StepMeans(self.policy, coefficients, to_device(conditions, self.device))
        y = to_device(torch.randn(n, self.dim, generator=generator) * self.prior_std, self.device)
        y = reverse_process(grid, sampler, y, mean,
                            lambda: to_device(torch.randn(n, self.dim, generator=generator), self.device))
        return to_device(y, CPU)


class DenoisingRollout(Rollout):
    """A Rollout whose training batches are noised data: `states` Y_k (K, B, d), `actions` the regression targets,
    `final_states` the clean x0 and `terminal_rewards` h(x0). Evaluation samples (generate) run the reverse process
    as for any run."""

    def __init__(self, *args, labels: Optional[torch.Tensor] = None, tilt: Optional[DataTilt] = None, **kwargs):
        """tilt: weighted dsm's row probabilities (data_tilt), None for plain dsm."""
        super().__init__(*args, labels=labels, **kwargs)
        self.labels = to_device(labels, self.device)
        self.variances = smoothed_variance(self.grid.mu, self.grid.sigma2, self.ratio.bandwidth)
        # on the CPU, with the generators that draw from them
        self.row_probabilities = tilt.probabilities if tilt is not None else None

    @torch.inference_mode()
    def run(self, chunks: Sequence[Chunk], rewards: Optional[bool] = None,
            on_state: Optional[Callable[[int, torch.Tensor], None]] = None) -> Trajectories:
        """The batch of `chunks`: each chunk's generator draws its data rows (by the tilt's probabilities in weighted
        dsm), then its noise (K, size, d), on the CPU (the same numbers on every device); the terminal rewards are
        computed on the CPU too."""
        data, K = self.ratio.data, self.grid.num_steps
        rows, noise = [], []
        for seed, size in chunks:
            gen = torch.Generator().manual_seed(seed)
            rows.append(data_rows(data.shape[0], size, gen, self.row_probabilities))
            noise.append(torch.randn(K, size, self.dim, generator=gen))
        index = to_device(torch.cat(rows), self.device)
        x0 = data[index]
        states, targets = noised_data(x0, self.grid.mu, self.variances, to_device(torch.cat(noise, 1), self.device))
        conditions = self.labels[index] if self.labels is not None else None
        terminal, parts = self.terminal_rewards_by_part(x0, conditions)
        return Trajectories(states, targets, None, x0, terminal, conditions, terminal_reward_parts=parts)
