"""Config schema versions: a stored config from before ``schema_version`` existed (the shipped default of
schema 1, committed as a fixture) still rebuilds the same model, bit for bit; newer schemas are refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from training.checkpoint import CheckpointError, config_of
from training.config import SCHEMA_VERSION, KAEMConfig, get_preset
from training.model.kaem import KAEM
from training.sample import sample_images

FIXTURES = Path(__file__).parent / "fixtures"
V1 = json.loads((FIXTURES / "config_v1_fmnist.json").read_text())
# Recorded with the code of schema 1 (commit 42ff555): the initial parameters of KAEM(config) and its
# images for seeds 0-15.
V1_IDENTITY = "ec6559bb0a2714a1"
V1_PARAMS_SHA256 = "fe26c15711eea7c6b7e17bde38788efb9148ad58579d864961280fc7bee79f5c"

pytestmark = pytest.mark.usefixtures("one_thread")


def _params_sha256(model: KAEM) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_v1_config_reads_as_schema_1_with_its_old_identity() -> None:
    assert "schema_version" not in V1
    cfg = KAEMConfig.from_dict(V1)
    assert cfg.schema_version == 1
    assert cfg.identity() == V1_IDENTITY  # the served contract's config_id does not move
    assert cfg.prior.kind == "univariate" and cfg.posterior.cd_samples == 0


def test_v1_config_rebuilds_the_same_model_bit_for_bit() -> None:
    model = KAEM(KAEMConfig.from_dict(V1))
    assert _params_sha256(model) == V1_PARAMS_SHA256
    images = sample_images(model, range(16))
    np.testing.assert_array_equal(images, np.load(FIXTURES / "config_v1_fmnist_images.npy"))


def test_round_trip_keeps_the_version() -> None:
    cfg = KAEMConfig.from_dict(V1)
    again = KAEMConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.schema_version == 1
    fresh = get_preset("fmnist")
    assert fresh.schema_version == SCHEMA_VERSION
    assert KAEMConfig.from_dict(json.loads(fresh.to_json())) == fresh


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, "2"])
def test_unknown_schema_versions_are_refused(version: object) -> None:
    with pytest.raises(ValueError, match="schema_version"):
        KAEMConfig.from_dict({**V1, "schema_version": version})
    ckpt = {"config_json": json.dumps({**V1, "schema_version": version}), "path": "x.pt"}
    with pytest.raises(CheckpointError, match="upgrade kaem-serve"):
        config_of(ckpt)
