"""The records a backend hands an algorithm: one episode's batch of trajectories and the chunks it is made of.

A batch is made of chunks, each with its own seed derived from (seed, episode, chunk index), so a batch is the same
however its chunks are spread over workers or replicas, and resuming at an episode needs no saved generator state.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

Chunk = tuple[int, int]
"""(seed, number of trajectories)."""


@dataclass
class Trajectories:
    """A batch of B trajectories of K steps: states Y_k and actions a_k (K, B, d), running rewards r_hat_k (K, B)
    (E14), final states Y_K (B, d), unweighted terminal rewards h(Y_K) (B,) and, in conditional runs, each
    trajectory's condition index (B,). For train.policy_gradient = rao_blackwell also the ratio scores s_hat_k
    (K, B, d) of r_hat_k, the mean action's successors (the step from Y_k with a_k = mu_k and the same Brownian
    noise) (K, B, d) and h at the last of them (B,). With a list reward.fn also each listed reward h_i(Y_K) (B, R),
    unweighted (the per-reward training metrics)."""

    states: torch.Tensor
    actions: torch.Tensor
    running_rewards: Optional[torch.Tensor]
    final_states: torch.Tensor
    terminal_rewards: torch.Tensor
    conditions: Optional[torch.Tensor] = None
    ratio_scores: Optional[torch.Tensor] = None
    mean_successors: Optional[torch.Tensor] = None
    mean_terminal_rewards: Optional[torch.Tensor] = None
    terminal_reward_parts: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.final_states.shape[0]

    @staticmethod
    def concat(parts: Sequence["Trajectories"]) -> "Trajectories":
        """Join batches along the batch dimension, in order."""
        if len(parts) == 1:
            return parts[0]

        def joined(name: str, dim: int) -> Optional[torch.Tensor]:
            first = getattr(parts[0], name)
            return None if first is None else torch.cat([getattr(p, name) for p in parts], dim)

        return Trajectories(*(joined(field.name, 0 if field.name in _PER_TRAJECTORY else 1)
                              for field in dataclasses.fields(Trajectories)))


_PER_TRAJECTORY = ("final_states", "terminal_rewards", "conditions", "mean_terminal_rewards",
                   "terminal_reward_parts")
"""Trajectories fields indexed by trajectory first; the others are (K, B, ...)."""


def episode_chunks(seed: int, episode: int, batch_size: int, chunk_size: int) -> list[Chunk]:
    """The chunks of one episode's batch: sizes summing to batch_size, seeds from (seed, episode, index)."""
    sizes = [chunk_size] * (batch_size // chunk_size) + ([batch_size % chunk_size] if batch_size % chunk_size else [])
    return [(int(np.random.SeedSequence([seed, episode, i]).generate_state(1)[0]), size) for i, size in enumerate(sizes)]
