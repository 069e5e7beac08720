"""perf_analyzer ``--input-data`` files of VALID uniforms (its own random data is raw bytes, not
uniforms in (0, 1)): one entry per seed from the project's seed generator, names from the contract.

``python -m serving.perf_data --model-repository model_repository --model kaem_fmnist --out in.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from export.contract import DEFAULT_MODEL_NAME, INPUT_SEED, INPUT_TRUNCATION, INPUT_U, ModelContract, request_rows
from export.triton_config import contract_from_config, parse_config
from serving.client import ServingError
from training.cli import command


def perf_input_data(contract: ModelContract, n: int = 64, first_seed: int = 0, truncation: float = 1.0) -> dict:
    """``{"data": [{"u": {"content": [...], "shape": [D]}}, ...]}`` for seeds ``first_seed ..
    first_seed+n-1`` (perf_analyzer uses the entries round-robin; the shape excludes the batch); for a seed
    model each entry is ``{"seed": {"content": [s], "shape": [1]}, "truncation": {...}}``."""
    if n < 1:
        raise ValueError(f"need at least one entry, got n={n}")
    rows = request_rows(range(first_seed, first_seed + n), contract, truncation)
    # .item() of a float32 gives the float that round-trips exactly and always prints as one ("1.0", never
    # "1"); of an int64, the int
    return {"data": [{name: {"content": [x.item() for x in a[i]], "shape": [a.shape[1]]} for name, a in rows.items()}
                     for i in range(n)]}


def write_perf_input(path: str | Path, contract: ModelContract, n: int = 64, first_seed: int = 0,
                     truncation: float = 1.0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(perf_input_data(contract, n, first_seed, truncation)) + "\n")
    return path


def contract_from_repository(repo: str | Path, model: str) -> ModelContract:
    """The contract in ``<repo>/<model>/config.pbtxt``."""
    config = Path(repo) / model / "config.pbtxt"
    if not config.is_file():
        raise FileNotFoundError(f"no {config}: wrong --model-repository or --model?")
    return contract_from_config(parse_config(config.read_text()))


@command
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.perf_data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="repository holding the model config")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME, help="model whose contract sets D")
    p.add_argument("--n", type=int, default=64, help="number of entries (seeds)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed")
    p.add_argument("--out", default="perf_input.json", help="JSON file to write")
    args = p.parse_args(argv)
    contract = contract_from_repository(args.model_repository, args.model)
    try:
        path = write_perf_input(args.out, contract, args.n, args.first_seed)
    except OSError as err:
        raise ServingError(f"cannot write {args.out}: {err}") from err
    tensors = f"{INPUT_U}[{contract.u_dim}]" if contract.inputs == "u" else f"{INPUT_SEED}[1], {INPUT_TRUNCATION}[1]"
    print(f"wrote {path}: {args.n} entries of {tensors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
