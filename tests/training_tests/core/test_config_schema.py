"""Config schema versions: a stored config from before ``schema_version`` existed (the shipped default of
schema 1, committed as a fixture) migrates to the current schema with what schema 1 meant (not today's
defaults) and rebuilds the same model, bit for bit; incomplete current configs and newer schemas are refused."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from testpaths import FIXTURES

from training.checkpoint import CheckpointError, config_of
from training.config import SCHEMA_VERSION, KAEMConfig, get_preset, migrate
from training.errors import ConfigError
from training.model.kaem import KAEM
from training.sample import sample_images

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


def test_v1_config_migrates_with_its_old_identity_and_meaning() -> None:
    assert "schema_version" not in V1 and "lr_schedule" not in V1["train"] and "baseline" not in V1
    cfg = KAEMConfig.from_dict(V1)
    assert cfg.schema_version == SCHEMA_VERSION
    assert cfg.identity() == V1_IDENTITY  # the served contract's config_id does not move
    assert cfg.prior.kind == "univariate" and cfg.posterior.cd_samples == 0
    # Fields the fixture lacks take what schema 1 meant, frozen in the migration, not the current defaults.
    assert (cfg.train.lr_schedule, cfg.train.prior_lr_ratio, cfg.train.domain_update) == ("constant", 1.0, False)
    assert (cfg.posterior.step_size, cfg.posterior.langevin_steps, cfg.posterior.n_temps) == (1e-3, 40, 5)
    assert migrate(V1) == json.loads(cfg.to_json())  # the migrated dict is complete: it rebuilds cfg as is


def test_a_current_config_with_a_missing_field_is_refused() -> None:
    d = json.loads(get_preset("fmnist").to_json())
    del d["posterior"]["n_samples"]
    with pytest.raises(ConfigError, match=r"incomplete config: PosteriorConfig lacks \['n_samples'\]"):
        KAEMConfig.from_dict(d)
    d["posterior"]["n_samples"] = 7
    del d["train"]["prior_lr_ratio"]  # ...except the one field schema 2 gained after its first configs
    with pytest.raises(ConfigError, match=r"TrainConfig lacks \['prior_lr_ratio'\]"):
        KAEMConfig.from_dict(d)  # schema 3 was born with it
    d["train"]["prior_lr_ratio"] = 1.0
    for field in ("pool_refresh", "pool_finalists"):  # the same dict as schema 3 wrote it
        del d["posterior"][field]
    with pytest.raises(ConfigError, match=r"PosteriorConfig lacks \['pool_finalists', 'pool_refresh'\]"):
        KAEMConfig.from_dict(d)
    d["schema_version"] = 3
    three = KAEMConfig.from_dict(d)
    assert three.posterior.pool_refresh == 0 and three.posterior.pool_finalists == 4
    del d["train"]["prior_lr_ratio"], d["posterior"]["persistent"]  # as schema 2's first configs wrote it
    d["schema_version"] = 2
    old = KAEMConfig.from_dict(d)
    assert old.train.prior_lr_ratio == 1.0 and old.posterior.persistent is False and old.posterior.pool_refresh == 0
    assert old.schema_version == SCHEMA_VERSION


def test_v1_config_rebuilds_the_same_model_bit_for_bit() -> None:
    model = KAEM(KAEMConfig.from_dict(V1))
    assert _params_sha256(model) == V1_PARAMS_SHA256
    images = sample_images(model, range(16))
    np.testing.assert_array_equal(images, np.load(FIXTURES / "config_v1_fmnist_images.npy"))


def test_round_trip_keeps_the_version() -> None:
    cfg = KAEMConfig.from_dict(V1)
    again = KAEMConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.schema_version == SCHEMA_VERSION
    fresh = get_preset("fmnist")
    assert fresh.schema_version == SCHEMA_VERSION
    assert KAEMConfig.from_dict(json.loads(fresh.to_json())) == fresh


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, "2"])
def test_unknown_schema_versions_are_refused(version: object) -> None:
    with pytest.raises(ConfigError, match="schema_version"):
        KAEMConfig.from_dict({**V1, "schema_version": version})
    ckpt = {"config_json": json.dumps({**V1, "schema_version": version}), "path": "x.pt"}
    with pytest.raises(CheckpointError, match="upgrade kaem-serve"):
        config_of(ckpt)
