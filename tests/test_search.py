"""`autopeft search` end to end on a tiny BERT: run folder, export, resume, failures, interruption."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
from transformers import AutoTokenizer

from autopeft.cli import main
from autopeft.data import load_raw, prepare
from autopeft.plan import make_plan
from autopeft.rundir import RunDir, open_study
from autopeft.spec import load_spec
from conftest import plain_peft_test_predictions, write_spec

PLUGIN = Path(__file__).parent / "plugins" / "test_variants.py"


def read_trials(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def test_search_writes_the_run_folder_and_a_ready_adapter(classification_spec):
    assert main(["search", str(classification_spec)]) == 0
    run = classification_spec.parent / "run"
    assert {"study.db", "spec.yaml", "trials.csv", "best"} <= {p.name for p in run.iterdir()}

    rows = read_trials(run)
    assert [r["number"] for r in rows] == ["0", "1"]
    assert all(r["state"] == "COMPLETE" for r in rows)
    assert {"param_learning_rate", "param_lora.r", "val_accuracy", "val_macro_f1", "seconds", "failure_reason"} <= set(rows[0])

    best = run / "best"
    assert {"adapter_config.json", "adapter_model.safetensors", "autopeft.json", "README.md"} <= {p.name for p in best.iterdir()}
    info = json.loads((best / "autopeft.json").read_text())
    assert info["trial"] in (0, 1) and info["variant"] == "lora"
    assert set(info["validation"]) == {"accuracy", "macro_f1", "eval_loss"} and set(info["test"]) == set(info["validation"])
    assert info["base_model"]["labels"] == ["neg", "pos"]
    assert {"torch", "transformers", "peft", "optuna"} <= set(info["versions"])
    best_accuracy = max(float(r["val_accuracy"]) for r in rows)
    assert info["validation"]["accuracy"] == pytest.approx(best_accuracy)
    # Only adapters that may still be exported are kept.
    assert [p.name for p in (run / "adapters").iterdir()] == [f"trial-{info['trial']}"]
    card = (best / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "library_name: peft" in card


def test_the_exported_adapter_loads_in_plain_peft_with_the_same_predictions(classification_spec, tiny_bert):
    assert main(["search", str(classification_spec)]) == 0
    best = classification_spec.parent / "run" / "best"
    info = json.loads((best / "autopeft.json").read_text())
    # A user's fresh process: base model from its folder, the adapter from best/, nothing from autopeft.
    predictions, recorded = plain_peft_test_predictions(best, tiny_bert, classification_spec)
    assert predictions == recorded
    spec = load_spec(classification_spec)
    data = prepare(load_raw(spec, make_plan(spec).registry), AutoTokenizer.from_pretrained(tiny_bert), spec)
    accuracy = sum(p == e["labels"] for p, e in zip(predictions, data.test)) / len(data.test)
    assert accuracy == pytest.approx(info["test"]["accuracy"])


def test_running_again_resumes_without_repeating_trials(classification_spec):
    assert main(["search", str(classification_spec)]) == 0
    run = classification_spec.parent / "run"
    first = read_trials(run)
    assert main(["search", str(classification_spec)]) == 0
    assert read_trials(run) == first  # nothing new: the study already holds n_trials finished trials

    assert main(["search", str(classification_spec), "--n-trials", "3"]) == 0
    extended = read_trials(run)
    assert len(extended) == 3 and extended[:2] == first


def test_a_changed_spec_does_not_mix_into_an_existing_run(classification_spec, capsys):
    assert main(["search", str(classification_spec)]) == 0
    text = classification_spec.read_text().replace("max_steps: 12", "max_steps: 13")
    classification_spec.write_text(text)
    assert main(["search", str(classification_spec)]) == 2
    assert "training.max_steps" in capsys.readouterr().err


def test_a_failing_trial_is_recorded_with_its_reason_and_the_search_goes_on(tmp_path, tiny_bert, sentiment_csv):
    spec_path = write_spec(
        tmp_path,
        model={"id": str(tiny_bert)},
        data={"source": str(sentiment_csv)},
        plugins=[str(PLUGIN)],
        search={"variants": ["flaky"], "n_trials": 3, "baseline": False, "space": {}},
    )
    spec = load_spec(spec_path)
    run_dir = RunDir(spec.run_dir)
    run_dir.path.mkdir(parents=True)
    study = optuna.create_study(study_name="autopeft", storage=run_dir.storage_url, direction="maximize")
    for mode in ("raise", "nan", "ok"):
        study.enqueue_trial({"flaky.mode": mode, "learning_rate": 1e-2})

    assert main(["search", str(spec_path)]) == 0
    rows = read_trials(run_dir.path)
    assert [r["state"] for r in rows] == ["FAIL", "FAIL", "COMPLETE"]
    assert "RuntimeError: the adapter could not be built" in rows[0]["failure_reason"]
    assert "loss became nan" in rows[1]["failure_reason"]
    assert "Traceback" in run_dir.log(0).read_text()
    assert json.loads((run_dir.best / "autopeft.json").read_text())["trial"] == 2


def test_ctrl_c_keeps_finished_trials_and_the_next_run_finishes_the_search(tmp_path, tiny_bert, sentiment_csv, monkeypatch):
    spec_path = write_spec(
        tmp_path,
        model={"id": str(tiny_bert)},
        data={"source": str(sentiment_csv)},
        plugins=[str(PLUGIN)],
        search={"variants": ["interruptible"], "n_trials": 3, "space": {}},
    )
    monkeypatch.setenv("AUTOPEFT_TEST_INTERRUPT_TRIAL", "1")
    assert main(["search", str(spec_path)]) == 130
    run = tmp_path / "run"
    rows = read_trials(run)
    assert rows[0]["state"] == "COMPLETE"
    assert rows[1]["state"] == "INTERRUPTED" and rows[1]["failure_reason"].startswith("interrupted (")

    monkeypatch.delenv("AUTOPEFT_TEST_INTERRUPT_TRIAL")
    assert main(["search", str(spec_path)]) == 0
    rows = read_trials(run)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(complete) == 3 and rows[0] == read_trials(run)[0]
    # The interrupted configuration ran again first.
    assert complete[1]["param_learning_rate"] == rows[1]["param_learning_rate"]


def test_export_any_finished_trial(classification_spec, capsys):
    assert main(["search", str(classification_spec)]) == 0
    run = classification_spec.parent / "run"
    best = json.loads((run / "best" / "autopeft.json").read_text())["trial"]
    other = 1 - best
    recorded = float(read_trials(run)[other]["val_accuracy"])

    out = classification_spec.parent / "exported"
    assert main(["export", str(run), "--trial", str(other), "--out", str(out)]) == 0
    info = json.loads((out / "autopeft.json").read_text())
    # The trial was not kept, so it was trained again from its seed: same score as during the search.
    assert info["trial"] == other and info["validation"]["accuracy"] == pytest.approx(recorded)
    assert (out / "adapter_model.safetensors").is_file()

    assert main(["export", str(run), "--trial", "7", "--out", str(out)]) == 2
    assert "has no trial 7" in capsys.readouterr().err


def test_the_study_lives_in_sqlite_with_the_seeded_tpe_sampler(classification_spec):
    assert main(["search", str(classification_spec)]) == 0
    study = open_study(RunDir(classification_spec.parent / "run"), "maximize")
    assert len(study.trials) == 2
    # The first trial is the variant's default configuration, as a baseline.
    assert study.trials[0].params["lora.r"] == 8 or study.trials[0].user_attrs.get("baseline")
