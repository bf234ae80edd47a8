"""What learns from a batch: the batch record (batch.Trajectories), Algorithm 1's q-learning update with its
policy-gradient variants (learner: TD errors and the semi-gradient update, E15-E16), the policy-gradient baselines
(policy_gradient: DDPO, DPOK) and denoising score matching, plain and reward-weighted (dsm)."""
