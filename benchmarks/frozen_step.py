"""A past revision's IS training step, timed on request: the frozen reference of benchmarks/train_step.py.

    python benchmarks/frozen_step.py ROOT [--threads N]

ROOT holds a ``training`` package extracted from git history (train_step.py does that with ``git archive``).
The step is the schema-1 fmnist configuration (tests/fixtures/config_v1_fmnist.json) with that revision's IS
loss and its optimiser as it was (torch's default Adam), on the same fixed batch as train_step.py. For every
line ``STEP`` read from stdin it runs training step STEP and prints the seconds it took; once built, "ready"
and the path the package was imported from (train_step.py checks it is the revision's).
Nothing here imports the working tree's ``training``: the revision's own code is what is timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "config_v1_fmnist.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="folder holding the revision's training package")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    sys.path.insert(0, str(args.root.resolve()))

    import torch

    from training.config import KAEMConfig
    from training.losses import importance_sampling_loss
    from training.model import KAEM
    from training.uniforms import step_generator

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = KAEMConfig.from_dict(json.loads(FIXTURE.read_text()))
    model = KAEM(cfg, init_seed=0)
    x = torch.rand(cfg.train.batch_size, *cfg.decoder.image_shape, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    import training

    print("ready", training.__file__, flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        out = importance_sampling_loss(model, x, step_generator(0, int(line)), cfg.posterior)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        print(time.perf_counter() - t0, flush=True)


if __name__ == "__main__":
    main()
