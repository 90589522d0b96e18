from megatron_rpo.plot import panel_lines


def test_a_panel_draws_one_measure_for_both_splits():
    # Issue 31 item 8: a KTO run (unpaired training, paired held-out set) drew the training reward
    # AUC and the evaluation accuracy in one panel.
    unpaired = {"train/loss": [(1, 0.7)], "train/contrast/reward_auc": [(1, 0.5)], "eval/loss": [(1, 0.7)],
                "eval/rewards/accuracies": [(1, 0.5)], "eval/contrast/reward_auc": [(1, 0.6)]}
    assert dict(panel_lines(unpaired)) == {"loss": [("train", "loss"), ("eval", "loss")], "reward margin": [],
                                           "accuracy": [("train", "contrast/reward_auc"),
                                                        ("eval", "contrast/reward_auc")]}
    paired = {"train/rewards/accuracies": [(1, 0.5)], "train/contrast/reward_auc": [(1, 0.5)],
              "eval/rewards/accuracies": [(1, 0.5)]}
    assert dict(panel_lines(paired))["accuracy"] == [("train", "rewards/accuracies"), ("eval", "rewards/accuracies")]
    assert dict(panel_lines({"eval/contrast/reward_auc": [(2, 0.5)]}))["accuracy"] == [("eval", "contrast/reward_auc")]
