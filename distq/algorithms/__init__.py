"""What learns from a batch: the batch record (batch.Trajectories) and the one Learner (learner: networks,
optimisers, the update's end) with its objectives: Algorithm 1's q-learning with its policy-gradient variants
(q_learning: TD errors and the semi-gradient update, E15-E16), the policy-gradient baselines (policy_gradient: DDPO,
DPOK) and denoising score matching, plain and reward-weighted (dsm)."""
