"""The default training job, stated once: train.py's flags, the Makefile (which passes none) and
the KubeRay options read these. Kept free of imports so the KubeRay renderer can read them
without torch or Ray."""
WORKERS = 3      # Ray Train workers = data shards
EPOCHS = 2       # passes of each worker over its shard
BATCH_SIZE = 100  # examples per step per worker
