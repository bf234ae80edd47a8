"""Algorithm 1 on two processes (train.processes = 2): the actor in the training process, the critic in a child.

The actor rolls out the policy (E10, E5) and updates the policy mean; the critic computes the ratio-estimated
running rewards (E13-E14) and updates the value network. Per episode they swap through shared memory what the
other half of the TD error (E15) needs: the critic's J_phi and r_hat, the actor's q_psi. Each then backpropagates
through its own network only (E16), which is the single-process learner's gradient (distq.algorithms.q_learning), so
the numbers are the same. What changes is the clock: the critic's forward overlaps the actor's, and its backward and
Adam step overlap the actor's next rollout.

Per episode: the actor draws Y_k and every few k sends "state" (the critic computes s_hat there, during the rest
of the rollout) -> "forward" (the critic forms r_hat and J while the actor computes q) -> the actor forms delta ->
"backward" -> both descend. The critic clones its inputs, so the actor may overwrite the buffers once the critic
has replied.
"""
from __future__ import annotations

import io
import time
from typing import Any, Optional

import torch
import torch.multiprocessing as mp

from distq.algorithms import q_learning
from distq.algorithms.batch import Trajectories, episode_chunks
from distq.algorithms.learner import TrainingDiverged
from distq.backends.backend import LocalLearner
from distq.backends.build import build_learner, build_rollout
from distq.errors import DistqError
from distq.problems.data import Dataset
from distq.setup.config import Config, config_from_dict
from distq.setup.machine import configure_cpu

_VALUE_STATE = ("value",)
_NO_REPLY = ("state", "backward")
_STATES_PER_MESSAGE = 4
"""States per "state" message: fewer messages cost the actor less; the critic still keeps pace with the rollout."""


def _no_reward(points: torch.Tensor, conditions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The critic needs no terminal reward: the actor computes h(Y_K), and the value net's scale comes with its state."""
    return points.new_zeros(points.shape[0])


def _buffers(config: Config, dim: int) -> dict[str, torch.Tensor]:
    K, B = config.sde.num_steps, config.train.batch_size
    shapes = {"states": (K, B, dim), "actions": (K, B, dim), "final_states": (B, dim), "terminal_rewards": (B,),
              "running_rewards": (K, B), "values": (K, B), "q": (K, B)}
    return {name: torch.zeros(shape).share_memory_() for name, shape in shapes.items()}


class _Critic:
    """The child process's half: ratio rewards, J_phi and the value network's semi-gradient step."""

    def __init__(self, config: Config, points: torch.Tensor, labels: Optional[torch.Tensor],
                 buffers: dict[str, torch.Tensor], state: dict):
        configure_cpu(config.train.threads)
        self.learner = build_learner(config, points, _no_reward, labels)
        self.learner.load_state_dict(state)
        self.rollout = build_rollout(config, points, _no_reward, policy=self.learner.policy, labels=labels)
        self.buffers = buffers
        self.pending: tuple[Trajectories, torch.Tensor] | None = None
        self.chunks, self.subsets, self.conditions, self.scores = None, [], None, None
        self.value_norm: float | None = None

    def state(self, message: tuple) -> None:
        """s_hat (E13) at states Y_first..Y_last as soon as the actor has drawn them; message = (first, last,
        chunks of the batch). The batch's data subsets and conditions are drawn again here from the chunks' seeds."""
        first, last, chunks = message
        if first == 0:
            self.chunks = chunks
            self.subsets, self.conditions = self.rollout.ratio_draws(chunks)
            self.scores = torch.empty_like(self.buffers["actions"])
        for k in range(first, last + 1):
            self.scores[k] = self.rollout.ratio_score(self.buffers["states"][k].clone(), k, self.chunks, self.subsets,
                                                      self.conditions)

    def forward(self, _) -> float | None:
        """r_hat and J of the batch in the buffers, written back; returns the previous update's value grad norm."""
        b = self.buffers
        batch = Trajectories(*(b[name].clone() for name in ("states", "actions")), None,
                             *(b[name].clone() for name in ("final_states", "terminal_rewards")), self.conditions)
        batch.running_rewards = self.rollout.rewards_from_scores(self.scores, batch.actions)
        values = q_learning.values(self.learner, batch)
        b["running_rewards"].copy_(batch.running_rewards)
        b["values"].copy_(values.detach())
        self.pending = (batch, values)
        return self.value_norm

    def backward(self) -> None:
        """The value network's step (E16) on the pending batch, with the actor's q from the buffers."""
        batch, values = self.pending
        loss, _ = q_learning.td_loss(self.learner, values, self.buffers["q"].clone(), batch)
        self.value_norm = self.learner.descend(loss, _VALUE_STATE)["value"]
        self.learner.updates += 1
        self.pending = None


def to_bytes(state: dict) -> bytes:
    """A learner state as bytes: sent as tensors, it would move the sender's live tensors to shared memory, and the
    receiver's Adam would then step the sender's moment estimates in place."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), weights_only=False)


def _failure(err: BaseException) -> tuple[str, str]:
    if isinstance(err, TrainingDiverged):
        return "diverged", str(err)
    return "error", f"{type(err).__name__}: {err}"


def _serve(conn, config_values: dict, points: torch.Tensor, labels: Optional[torch.Tensor],
           buffers: dict[str, torch.Tensor], state: bytes) -> None:
    """The critic process: answer the actor's commands until "close" or until the actor is gone."""
    failed = None
    try:
        critic = _Critic(config_from_dict(config_values), points, labels, buffers, from_bytes(state))
    except Exception as err:  # reported to the actor at its first call
        failed = _failure(err)
    else:
        handlers = {"state": critic.state, "forward": critic.forward, "backward": lambda _: critic.backward(),
                    "learner": lambda _: to_bytes(critic.learner.state_dict()),
                    "load": lambda payload: critic.learner.load_state_dict(from_bytes(payload))}
    while True:
        try:
            command, payload = conn.recv()
        except (EOFError, OSError):
            return
        if command == "close":
            return
        if failed is None:
            try:
                reply = handlers[command](payload)
            except Exception as err:  # the critic's state is suspect from here on: every later call reports it
                failed = _failure(err)
        if command not in _NO_REPLY:  # a failure there is reported at the next call
            conn.send(failed or ("ok", reply))


class TwoProcessBackend(LocalLearner):
    """The backend interface of distq.training.trainer.InProcessBackend with the critic in a child process."""

    workers = 0
    restarts = 0

    def __init__(self, config: Config, dataset: Dataset, reward):
        self.config = config
        self.learner = build_learner(config, dataset.points, reward, dataset.labels)
        self.rollout = build_rollout(config, dataset.points, reward, policy=self.learner.policy, labels=dataset.labels)
        self.buffers = _buffers(config, dataset.dim)
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, name="distq-critic", daemon=True,
                                       args=(child, config.to_dict(), dataset.points, dataset.labels, self.buffers,
                                             to_bytes(self.learner.state_dict())))
        self.process.start()
        child.close()

    def _stopped(self) -> DistqError:
        self.process.join(timeout=5)
        return DistqError(f"the critic process of train.processes = 2 stopped (exit code {self.process.exitcode}); "
                          "run with train.processes = 1 to see the error here")

    def _send(self, command: str, payload: Any = None) -> None:
        try:
            self.conn.send((command, payload))
        except OSError:  # BrokenPipeError when the critic is gone
            raise self._stopped() from None

    def _reply(self) -> Any:
        try:
            status, payload = self.conn.recv()
        except (EOFError, OSError):
            raise self._stopped() from None
        if status == "diverged":
            raise TrainingDiverged(payload)
        if status == "error":
            raise DistqError(f"the critic process of train.processes = 2 failed: {payload}")
        return payload

    def _call(self, command: str, payload: Any = None) -> Any:
        self._send(command, payload)
        return self._reply()

    def step(self, episode: int) -> dict[str, float]:
        """One episode of Algorithm 1, split as in the module docstring; grad_norm/value is the previous update's."""
        train, b = self.config.train, self.buffers
        began = time.perf_counter()
        chunks = episode_chunks(self.config.seed, episode, train.batch_size, train.chunk_size)

        last = self.config.sde.num_steps - 1

        def stream(k: int, y: torch.Tensor) -> None:
            b["states"][k].copy_(y)
            if k % _STATES_PER_MESSAGE == _STATES_PER_MESSAGE - 1 or k == last:
                first = k - k % _STATES_PER_MESSAGE
                self._send("state", (first, k, chunks if first == 0 else None))

        batch = self.rollout.run(chunks, rewards=False, on_state=stream)
        collected = time.perf_counter()
        for name in ("actions", "final_states", "terminal_rewards"):
            b[name].copy_(getattr(batch, name))
        self._send("forward")
        q = q_learning.q_values(self.learner, batch)
        value_norm = self._reply()
        batch.running_rewards = b["running_rewards"].clone()
        loss, delta = q_learning.td_loss(self.learner, b["values"].clone(), q, batch)
        b["q"].copy_(q.detach())
        self._send("backward")
        norms = self.learner.descend(loss, ("policy",))
        if value_norm is not None:
            norms["value"] = value_norm
        sums = q_learning.metric_sums(self.learner, delta, batch).tolist()
        metrics = {**q_learning.metrics_from_sums(self.learner, sums, batch.batch_size),
                   **self.learner.end_update(norms, collected)}
        metrics["time/rollout_s"] = collected - began
        metrics["time/transfer_s"] = 0.0
        return metrics

    def learner_state(self) -> dict[str, Any]:
        """Both halves' networks, optimisers and schedules, in distq.algorithms.learner.Learner's layout."""
        state, critic = self.learner.state_dict(), from_bytes(self._call("learner"))
        state["value"] = critic["value"]
        for part in ("optimizers", "schedulers"):
            state[part]["value"] = critic[part]["value"]
        return state

    def load_learner_state(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state)
        self._call("load", to_bytes(state))

    def close(self) -> None:
        """Stop the critic process (it also exits by itself when this process goes away)."""
        if self.process.is_alive():
            try:
                self.conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self.conn.close()
