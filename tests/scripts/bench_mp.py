"""`diffslim ARGS...` (bench, workflow) with short cached trainings (+kd, +ft, dipgo:R) and 8 layer calibration
triples, run under `accelerate launch` or in one process by tests/test_multiprocess.py."""

import sys

from diffslim import bench

bench.DEFAULT_KD.update(steps=2, batch_size=4)
bench.DEFAULT_FT.update(steps=2, batch_size=4)
bench.DEFAULT_DIPGO.update(iters=2, batch_size=2, select=2, restarts=1, anneal=2)
bench.LAYER_CALIB.update(n=8)

from diffslim.cli import main  # noqa: E402

sys.argv = ["diffslim", *sys.argv[1:]]
main()
