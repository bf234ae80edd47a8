"""Who runs the episodes (backend.Backend): in this process, with the critic in a second process
(two_process), over Ray actors (ray_actors) or as data-parallel replicas on Ray Train (data_parallel); the rollouts
that make batches (rollout); building networks, rollouts and learners from a config (build); joining a Ray cluster
(ray_cluster)."""
