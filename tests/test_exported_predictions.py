"""``best/test_predictions.csv`` reads on its own: each test example's text, its label and the prediction by name."""

from __future__ import annotations

import csv

from autopeft.cli import main
from autopeft.data import load_raw
from autopeft.plan import make_plan
from autopeft.spec import load_spec
from conftest import FILLER, plain_peft_test_predictions, sentiment_rows, write_spec


def test_test_predictions_hold_the_text_and_label_names(tmp_path, tiny_bert):
    """Catches: a file of ids only (no text, labels as class numbers), and long texts written whole."""
    rows = sentiment_rows(240)
    for row in rows[::3]:
        row["review"] = " ".join([row["review"]] + FILLER * 5)  # well over 200 characters
    data = tmp_path / "reviews.csv"
    with open(data, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["review", "sentiment"])
        writer.writeheader()
        writer.writerows(rows)
    spec_path = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(data)}, search={"n_trials": 1}, training={"max_steps": 4, "batch_size": 8})
    assert main(["search", str(spec_path)]) == 0

    best = tmp_path / "run" / "best"
    with open(best / "test_predictions.csv", newline="") as handle:
        recorded = list(csv.DictReader(handle))
    spec = load_spec(spec_path)
    test = load_raw(spec, make_plan(spec).registry)["test"]
    assert list(recorded[0]) == ["index", "text", "label", "prediction", "label_id", "prediction_id"]
    assert len(recorded) == len(test) == 40
    names = sorted({"pos", "neg"})  # label names in the order autopeft gives class ids
    long_ones = 0
    for row, text, label in zip(recorded, test["review"], test["sentiment"]):
        assert row["label"] == label and row["label"] == names[int(row["label_id"])]
        assert row["prediction"] == names[int(row["prediction_id"])]
        if len(text) > 200:
            long_ones += 1
            assert len(row["text"]) == 200 and row["text"].endswith("…") and text.startswith(row["text"][:-1])
        else:
            assert row["text"] == text
    assert long_ones > 0

    # The numeric column still matches what plain PEFT predicts in a fresh model.
    predictions, ids = plain_peft_test_predictions(best, tiny_bert, spec_path)
    assert predictions == ids
