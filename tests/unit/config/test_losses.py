import typing

import pytest

from megatron_rpo.config import LOSSES, Config, DataConfig, LossConfig


def test_every_loss_type_has_its_facts_and_its_math():
    from megatron_rpo.loss.objective import LOSS_TYPES

    declared = typing.get_args(typing.get_type_hints(LossConfig)["loss_type"])
    assert set(LOSSES) == set(LOSS_TYPES) == set(declared)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_the_config_reads_its_rules_from_the_facts(loss_type):
    facts = LOSSES[loss_type]
    loss = LossConfig(loss_type=loss_type, reference="online")
    assert (loss.uses_reference, loss.uses_matrix, loss.uses_mismatched) == (facts.reference, facts.matrix,
                                                                              facts.mismatched)
    for paired in (True, False):
        allowed = facts.data == "either" or facts.data == ("paired" if paired else "unpaired")
        if allowed:
            Config(loss=loss, data=DataConfig(paired=paired))
        else:
            with pytest.raises(ValueError, match=rf"loss.loss_type='{loss_type}'"):
                Config(loss=loss, data=DataConfig(paired=paired))
    paired = facts.data != "unpaired"
    scope = LossConfig(loss_type=loss_type, reference="online", contrast_scope="global_batch")
    if facts.matrix:
        Config(loss=scope, data=DataConfig(paired=paired))
    else:
        with pytest.raises(ValueError, match=r"only changes matrix losses \(rpo, simpo_rpo\)"):
            Config(loss=scope, data=DataConfig(paired=paired))
    if facts.mismatched:
        with pytest.raises(ValueError, match=r"needs loss.reference='online'"):
            Config(loss=LossConfig(loss_type=loss_type, reference="precomputed"), data=DataConfig(paired=False))
