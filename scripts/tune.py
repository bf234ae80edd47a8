"""Run a sweep with Ray Tune: `python scripts/tune.py [SWEEP.yaml] [--address auto] [--resume] [--num-samples N]`.

The same as `distq tune`. With no SWEEP it runs tuning/smoke.yaml (looked up in the working directory, then in
the distq checkout), so `ray submit cluster/gpu.yaml scripts/tune.py` works: ray submit copies this file alone to
the head node, where the cluster's setup commands installed distq (and exported RAY_ADDRESS=auto, so the sweep
joins the cluster instead of starting its own Ray).
"""
import sys

from distq.edges.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
