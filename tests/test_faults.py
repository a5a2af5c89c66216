"""Fault injection is a test-only hook (LATENTZOO_INJECT_FAULT), not part of the params users see."""

from __future__ import annotations

import pytest
from conftest import make_params

from latentzoo import faults
from latentzoo.errors import ConfigError


def test_a_planned_fault_names_one_point(monkeypatch):
    monkeypatch.setenv(faults.ENV, "train.epoch=2")
    assert faults.planned("train.epoch") == 2 and faults.planned("tune.trial") is None
    faults.fail_if_planned("train.epoch", 2, 1)
    with pytest.raises(faults.InjectedFailure, match="train.epoch=2"):
        faults.fail_if_planned("train.epoch", 2, 2)


def test_no_fault_without_the_variable_and_a_clear_error_for_a_bad_one(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.planned("train.epoch") is None
    monkeypatch.setenv(faults.ENV, "train.epoch=soon")
    with pytest.raises(ConfigError, match="LATENTZOO_INJECT_FAULT='train.epoch=soon': expected <point>=<n>"):
        faults.planned("train.epoch")


@pytest.mark.parametrize("key", ["train.fail_at_epoch", "tune.fail_trial"])
def test_the_params_schema_has_no_test_hooks(key):
    with pytest.raises(ConfigError, match="is not a known key"):
        make_params(**{key: 1})
