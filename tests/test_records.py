"""synth.records: each typed file reads back what its writer wrote, and names the first bad field otherwise."""

from __future__ import annotations

import pytest

from synth.records import RecordError, TrainMetrics, TrialRecord, TuneRow

CLASSES = ["bird", "cat"]
SCORES = {"accuracy": 0.75, "n": 4, "per_class": {}, "confusion_matrix": [[2, 0], [1, 1]]}


def test_train_metrics_round_trip_and_checks():
    m = TrainMetrics(experiment="train-real", train_domain="real", seed=0, classes=CLASSES, test={"real": SCORES}, val=SCORES)
    assert TrainMetrics.from_json(m.to_json()) == m
    bad = [
        ({"seed": "0"}, "seed='0' is not an integer"),
        ({"classes": []}, "classes=\\[\\] is not a non-empty list"),
        ({"test": {"real": {**SCORES, "accuracy": 1.5}}}, "test.real.accuracy is missing or not in \\[0, 1\\]"),
        ({"test": {"real": {**SCORES, "confusion_matrix": [[1]]}}}, "test.real.confusion_matrix is not 2x2"),
        ({"history": {}}, "history is not a list"),
    ]
    for change, message in bad:
        with pytest.raises(RecordError, match=message):
            TrainMetrics.from_json({**m.to_json(), **change})
    with pytest.raises(RecordError, match="missing key 'test'"):
        TrainMetrics.from_json({k: v for k, v in m.to_json().items() if k != "test"})
    # Readers tolerate fields a newer writer adds.
    assert TrainMetrics.from_json({**m.to_json(), "added_later": 1}) == m


def test_trial_record_and_tune_row():
    history = [{"epoch": 1, "step": 3, "train_loss": 1.0, "val_accuracy": 0.5, "val_loss": 1.0, "seconds": 0.1}]
    record = TrialRecord(experiment="e", ratio=0.5, seed=1, mode="fixed_budget", trial_hash="h", classes=CLASSES, val=SCORES,
                         test={"real": SCORES}, final={"completed": True}, history=history)  # fmt: skip
    assert TrialRecord.from_json(record.to_json()) == record
    with pytest.raises(RecordError, match="history is empty"):
        TrialRecord.from_json({**record.to_json(), "history": []})
    row = TuneRow(ratio=0.5, seed=1, status="completed", train_images=8, real_images=4, synthetic_images=4, epochs=1,
                  val_real_accuracy=0.5)  # fmt: skip
    assert TuneRow.from_json(row.to_json()) == row and "val_real_accuracy" in TuneRow.field_names()
    with pytest.raises(RecordError, match="status='done' is not one of completed"):
        TuneRow.from_json({**row.to_json(), "status": "done"})
    with pytest.raises(RecordError, match="has no val_real_accuracy"):
        TuneRow.from_json({**row.to_json(), "val_real_accuracy": None})
