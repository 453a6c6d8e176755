import os

# Keep torch and BLAS from oversubscribing the 2-core CI machine (several test processes share it).
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
