from megatron_rpo.training.checkpointing import describe_layout


def test_a_recorded_layout_is_described_by_name():
    # Issue 31 item 8: "trained as TP x PP x DP = [1, 1, 1, 2]" named three sizes for four numbers.
    assert describe_layout([2, 1, 4]) == "TP 2 x PP 1 x DP 4"
    assert describe_layout([1, 1, 1, 2]) == "TP 1 x PP 1 x DP 1 x CP 2"
    assert describe_layout([1, 2, 2, 2, 1]) == "TP 1 x PP 2 x DP 2 x EP 2 x ETP 1"
    assert describe_layout([2, 1, 2, 2, 1, 2]) == "TP 2 x PP 1 x DP 2 x EP 2 x ETP 1 x CP 2"
    assert describe_layout(None) == "an unrecorded layout"
