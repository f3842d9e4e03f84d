"""Experiment tracking (`--report-to`): what TensorBoard, MLflow and W&B hold after a run, read back with
their own readers and compared with metrics.jsonl, across a crash and a `--resume`."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_models import CrashAfter

from lorakit.errors import MissingDependencyError
from lorakit.options import OptionError
from lorakit.train.config import TRACKERS, DPOConfig, TrainConfig
from lorakit.train.sft import train
from lorakit.train.tracking import hyperparameters


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


TESTED = [name for name in ("tensorboard", "mlflow", "wandb") if _installed(name)]


def _config(output: Path, model_dir: Path, data: dict[str, Path], **overrides) -> TrainConfig:
    options = dict(
        model=str(model_dir), data=str(data["train"]), validation_data=str(data["validation"]),
        test_data=str(data["test"]), output=str(output), max_steps=4, eval_every=2, save_every=2,
        batch_size=4, learning_rate=5e-3, warmup_steps=0, eval_limit=2, eval_max_new_tokens=2, seed=3,
    )
    options.update(overrides)
    return TrainConfig.from_options(options)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, tiny_chat_model_dir, demo_subset) -> dict:
    """A run logged to every tested tracker that crashes as step 3 ends (its step 3 already sent to the
    trackers, its last checkpoint at step 2), then is resumed to its end at step 4."""
    if not TESTED:
        pytest.skip("no tracker installed")
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for a database; a file store is local
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        options = dict(report_to=TESTED, run_name="dates", project="lorakit-tests")
        config = _config(root / "run", tiny_chat_model_dir, demo_subset, **options)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(config, callbacks=[CrashAfter(2)])
        metrics = root / "run" / "metrics.jsonl"
        crashed = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
        # What the end of a crashed process does: its runs end (in one process, they would go on).
        if "mlflow" in TESTED:
            import mlflow

            mlflow.end_run(status="FAILED")
        if "wandb" in TESTED:
            import wandb

            wandb.finish(exit_code=1)
        result = train(_config(root / "run", tiny_chat_model_dir, demo_subset, resume=True, **options))
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"out": root / "run", "root": root, "config": config, "records": records, "report": result.report,
            "crashed": crashed}


def _series(records: list[dict], kind: str) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the trackers should hold it: `kind/name` -> [(step, value)] in step order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record["kind"] != kind:
            continue
        for key, value in record.items():
            if key not in ("kind", "step"):
                series.setdefault(f"{kind}/{key}", []).append((record["step"], value))
        if kind == "train":
            series.setdefault("train/tokens_per_second", []).append(
                (record["step"], record["tokens"] / record["elapsed"]))
    return series


def test_the_run_crashed_after_logging_a_step_past_its_checkpoint(resumed_run) -> None:
    assert resumed_run["crashed"] == [1, 2, 2, 3]  # train 1, train 2, eval 2, train 3 (lost)
    assert [r["step"] for r in resumed_run["records"] if r["kind"] == "train"] == [1, 2, 3, 4]


# ---- TensorBoard ------------------------------------------------------------------------------------


def test_tensorboard_scalars_equal_metrics_jsonl_step_by_step_after_a_resume(resumed_run) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(resumed_run["out"] / "logs" / "dates"),
                              size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    expected = {**_series(resumed_run["records"], "train"), **_series(resumed_run["records"], "eval")}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens", "eval/val_loss"} <= expected.keys()
    for tag, points in expected.items():
        got = [(event.step, event.value) for event in events.Scalars(tag)]
        assert [step for step, _ in got] == [step for step, _ in points], tag  # step 3 once: the resumed one
        assert [value for _, value in got] == pytest.approx([value for _, value in points], rel=1e-6), tag
    report = resumed_run["report"]
    for key in ("exact_match_adapter", "final_val_loss", "steps", "tokens_per_second"):
        assert [(e.step, e.value) for e in events.Scalars(f"report/{key}")] == [
            (4, pytest.approx(report[key]))]
    assert [image.step for image in events.Images("loss_curve")] == [4]
    samples = events.Tensors("report/exact_match_samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert samples.startswith("| question | reference | base | adapter |")
    assert len(samples.splitlines()) == 2 + report["test_rows"]


def test_dpo_reward_figures_reach_tensorboard(tmp_path, tiny_chat_model_dir) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lorakit.train.dpo import train_dpo
    from lorakit.train.preference_data import bundled_preference_path

    data = {}
    for split, size in (("train", 16), ("validation", 8)):
        data[split] = tmp_path / f"{split}.jsonl"
        lines = bundled_preference_path(split).read_text().splitlines()[:size]
        data[split].write_text("\n".join(lines) + "\n")
    config = DPOConfig.from_options(dict(
        model=str(tiny_chat_model_dir), data=str(data["train"]), validation_data=str(data["validation"]),
        output=str(tmp_path / "dpo"), max_steps=2, eval_every=2, batch_size=8, learning_rate=5e-3,
        warmup_steps=0, report_to="tensorboard"))
    train_dpo(config)
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "dpo" / "logs" / "dpo"))
    events.Reload()
    expected = {**_series(records, "train"), **_series(records, "eval")}
    assert {"train/reward_accuracy", "train/reward_margin", "eval/val_reward_accuracy"} <= expected.keys()
    for tag, points in expected.items():
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(tag)] == points, tag


# ---- MLflow -----------------------------------------------------------------------------------------


def test_mlflow_continues_the_run_with_its_params_and_metric_history(resumed_run) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(resumed_run["root"] / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("lorakit-tests").experiment_id])
    assert len(runs) == 1  # the resume continued the run it started
    run = runs[0]
    assert run.info.run_id == json.loads((resumed_run["out"] / "tracking.json").read_text())["mlflow"]
    assert run.info.run_name == "dates" and run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in hyperparameters(resumed_run["config"], "train").items()}

    expected = {**_series(resumed_run["records"], "train"), **_series(resumed_run["records"], "eval")}
    for key, points in expected.items():
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        # MLflow keeps every point: the crashed run's step 3 stays beside the resumed run's, which is last.
        latest = {m.step: m.value for m in history}
        assert sorted(latest) == [step for step, _ in points], key
        assert [latest[step] for step, _ in points] == pytest.approx([value for _, value in points]), key
    assert run.data.metrics["report/exact_match_adapter"] == resumed_run["report"]["exact_match_adapter"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "report.json"} <= artifacts


# ---- Weights & Biases (offline) ---------------------------------------------------------------------


def _wandb_records(path: Path):
    """The records of an offline W&B run file (wandb has no reader of its own in Python): a 7-byte header,
    then LevelDB's log format (32 KiB blocks of chunks, each with a 7-byte header: CRC, length, type
    FULL/FIRST/MIDDLE/LAST) holding wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (length == 0 and kind == 0):  # block trailer or padding
            pos += room
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_runs_hold_the_config_and_the_metrics(resumed_run) -> None:
    pytest.importorskip("wandb")
    files = sorted((resumed_run["out"] / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    run_id = json.loads((resumed_run["out"] / "tracking.json").read_text())["wandb"]
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # the resumed run has the crashed run's id
    history: dict[int, dict] = {}
    config = {}
    for file in files:  # later points of a step win, as the resumed run's do
        for record in _wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                          for item in record.history.item}
                history[values["_step"]] = values
            elif kind == "run":
                assert (record.run.project, record.run.display_name) == ("lorakit-tests", "dates")
            elif kind == "config":
                config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                               for item in record.config.update})
    assert (config["command"], config["learning_rate"]) == ("train", 5e-3)
    assert config["report_to"] == json.dumps(TESTED)
    expected = {**_series(resumed_run["records"], "train"), **_series(resumed_run["records"], "eval")}
    for key, points in expected.items():
        values = [value for _, value in points]
        assert [history[step][key] for step, _ in points] == pytest.approx(values), key
    assert history[4]["report/exact_match_adapter"] == resumed_run["report"]["exact_match_adapter"]


# ---- options and errors -----------------------------------------------------------------------------


def test_report_to_offers_every_tracker_of_accelerate() -> None:
    from accelerate.utils import LoggerType

    assert set(TRACKERS) == {str(t) for t in LoggerType} - {"all"}


@pytest.mark.parametrize(("value", "expected"), [
    ("tensorboard,mlflow", ["tensorboard", "mlflow"]),
    (["wandb"], ["wandb"]),
    ("none", ["none"]),
    ([], []),
])
def test_report_to_takes_a_list_of_trackers(value, expected) -> None:
    assert TrainConfig.from_options({"report_to": value}).report_to == expected


@pytest.mark.parametrize(("value", "message"), [
    ("tensorbord", r"--report-to: expected none or a list of tensorboard, mlflow, wandb, .*'tensorbord'"),
    ("none,wandb", "--report-to: none cannot be combined with trackers"),
])
def test_report_to_refuses_unknown_trackers(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_options({"report_to": value})


def test_run_name_and_project_are_not_blank() -> None:
    for name in ("run_name", "project"):
        with pytest.raises(OptionError, match=f"--{name.replace('_', '-')}: expected a non-empty name"):
            TrainConfig.from_options({name: " "})


def test_tracking_options_read_from_yaml(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"report_to": ["tensorboard"], "run_name": "r1", "logging_dir": "tb"}))
    config = TrainConfig.from_yaml(path)
    assert (config.report_to, config.run_name, config.logging_dir, config.project) == (
        ["tensorboard"], "r1", "tb", "lorakit")
    assert TrainConfig.from_options(config.to_options()) == config


def test_hyperparameters_are_the_resolved_options_as_scalars() -> None:
    config = TrainConfig.from_options({"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 4},
                                       "report_to": "tensorboard"})
    values = hyperparameters(config, "train")
    assert values["command"] == "train" and values["r"] == 8 and values["learning_rate"] == 1e-3
    assert values["target_modules"] == '["q_proj", "v_proj"]' and values["rank_pattern"] == '{"q_proj": 4}'
    assert values["max_steps"] == "null" and values["report_to"] == '["tensorboard"]'
    assert values.keys() == {"command", *config.to_options()}


def _missing_tracker() -> str:
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = [name for name in TRACKERS if name not in available]
    if not missing:
        pytest.skip("every tracker is installed")
    return missing[0]


def test_a_tracker_that_is_not_installed_fails_before_anything_runs(tmp_path) -> None:
    name = _missing_tracker()
    with pytest.raises(MissingDependencyError, match=rf"--report-to {name}: .* pip install 'lorakit\[{name}"):
        train(TrainConfig(output=str(tmp_path / "run"), report_to=[name], model=str(tmp_path / "no-model")))
    assert not (tmp_path / "run").exists()


def test_the_cli_names_the_extra_to_install_in_one_line(tmp_path) -> None:
    name = _missing_tracker()
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", "--report-to", name, "--output",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: --report-to {name}: the {name} package is not installed; "
        f"pip install 'lorakit[{name.replace('_', '-')}]'"]
