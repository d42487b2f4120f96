"""Keras' own Adam tests (``keras/src/optimizers/adam_test.py``, shipped with
Keras) with :class:`distadam.ShardedAdam` in ``Adam``'s place (issue 24): the
public surface users know, including the EMA (``use_ema``, the overwrite
frequency, ``_model_variables_moving_average`` after ``fit``)."""

import importlib

from distadam import ShardedAdam

adam_test = importlib.import_module("keras.src.optimizers.adam_test")


class TestKerasAdamSuiteWithShardedAdam(adam_test.AdamTest):
    def setUp(self):
        super().setUp()
        # The suite names `Adam` at module level: every test builds ShardedAdam.
        self.addCleanup(setattr, adam_test, "Adam", adam_test.Adam)
        adam_test.Adam = ShardedAdam


def test_the_peer_suite_is_all_there():
    """The suite runs whole: 9 tests in Keras 3.15 (a Keras that adds or
    drops some changes this number; look at what changed)."""
    names = [name for name in dir(adam_test.AdamTest) if name.startswith("test_")]
    assert len(names) == 9, names
