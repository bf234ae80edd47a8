"""The paper's equations as small modules, torch only: noise schedules (E1-E2), the ratio estimator and running
reward (E13-E14), the policy mean and q-function (E10-E11), the value function (E12), the samplers (E5, section 8) and
the evaluation metrics (kNN KL, confidence intervals)."""
