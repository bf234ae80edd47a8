"""Where users and other systems meet distq: the command line (cli), sweeps on Ray Tune (sweep files, tuning)
with W&B (wandb_callback), calibration of the KL budget (calibrate) and the RLlib environment (rllib_env)."""
