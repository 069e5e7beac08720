"""Refuse a model repository whose model files are not the ones their export recorded, before a server loads it:
``kaem-serve`` checks this at start (serving/local/launcher.py); in production the pod's init container runs this
file (deploy/k8s/deployment.yaml; the Dockerfile copies it to /opt/kaem/verify_repository.py), because Triton's
native onnxruntime backend loads any file that parses.

    python3 verify_repository.py [REPOSITORY]

For every model folder (``<model>/config.pbtxt``) and every version folder in it whose export recorded the sha256
of its model file (the config parameter ``artifact.sha256.<version>``, written by kaem-export), the file must be
there with that digest. Exit 0 with one line per model; exit 1 with one line on stderr naming the first file that
is missing or differs (a partial copy, another export's file, a disk error); exit 2 for a usage error.

Standalone on purpose: it imports only the standard library, protobuf and tritonclient's model config schema (both
installed in the production image with tritonclient[grpc]), so the image needs this one file
(tests/serving_tests/test_verify_repository.py runs a copy on its own).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

DEFAULT_REPOSITORY = "/models"  # the Dockerfile's COPY destination and the Deployment's --model-repository
RECORD_PREFIX = "artifact.sha256."  # export.triton_config.ARTIFACT_KEY with name "sha256"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify(repository: Path) -> list[str]:
    """One line per model whose recorded digests all match; raises RuntimeError naming what does not."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    if not repository.is_dir():
        raise RuntimeError(f"model repository {repository} does not exist")
    report = []
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config_path = model_dir / "config.pbtxt"
        if not config_path.is_file():
            raise RuntimeError(f"{model_dir} has no config.pbtxt (every folder in the repository is a model)")
        try:
            config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        except text_format.ParseError as err:
            raise RuntimeError(f"{config_path} does not parse: {err}") from None
        filename = config.default_model_filename or "model.onnx"
        recorded = {int(key.removeprefix(RECORD_PREFIX)): p.string_value for key, p in config.parameters.items()
                    if key.startswith(RECORD_PREFIX) and key.removeprefix(RECORD_PREFIX).isdigit()}
        checked = []
        for version_dir in sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                                  key=lambda p: int(p.name)):
            want = recorded.get(int(version_dir.name))
            if want is None:
                continue
            path = version_dir / filename
            if not path.is_file():
                raise RuntimeError(f"{path} is missing; its export recorded it in {config_path}")
            if (got := _digest(path)) != want:
                raise RuntimeError(f"{path} has sha256 {got[:16]}..., not the {want[:16]}... its export recorded in "
                                   f"{config_path}: the file changed after the export (a partial copy?); export it "
                                   "again")
            checked.append(version_dir.name)
        report.append(f"{model_dir.name}: version(s) {', '.join(checked)} match their recorded sha256" if checked
                      else f"{model_dir.name}: no recorded sha256 to check")
    if not report:
        raise RuntimeError(f"model repository {repository} holds no model folder")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repository", nargs="?", default=DEFAULT_REPOSITORY,
                   help="the model repository Triton will serve (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        report = verify(Path(args.repository))
    except (RuntimeError, OSError) as err:
        print(f"verify-repository: {err}", file=sys.stderr)
        return 1
    for line in report:
        print(f"verify-repository: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
