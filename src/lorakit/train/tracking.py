"""Experiment tracking: a run in TensorBoard, MLflow, W&B, trackio and accelerate's other trackers.

`--report-to` names trackers of accelerate's integrations (`accelerate.tracking`); lorakit has no client of
its own. The Trainer builds its Accelerator with `log_with(config)` and adds a `Tracking` callback, which

- starts the trackers before the model loads, with the resolved options as hyper-parameters
  (`hyperparameters`);
- logs each metrics record at its step: `train/<name>` and `eval/<name>` with metrics.jsonl's names
  (`train/loss`, `train/lr`, `train/grad_norm`, `eval/val_loss`, DPO's `train/reward_accuracy`, ...), and
  `train/tokens_per_second` (tokens / elapsed, the progress bar's figure);
- at the end logs the report's figures as `report/<name>` at the last step and, where the tracker takes
  them, the loss curve and the exact-match samples (`EXTRAS`), then closes the trackers.

Only the main process logs: accelerate starts the trackers there alone. `--resume` continues the same run:
TensorBoard writes to the same directory and drops the events logged after the checkpoint (SummaryWriter's
`purge_step`); MLflow and W&B continue the run whose id `tracking.json` in the run directory keeps; trackio
resumes the run of the same name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import LorakitError, MissingDependencyError
from lorakit.io.atomic import atomic_write_text
from lorakit.train.checkpoint import saved_progress
from lorakit.train.config import TuningConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

IDS_FILE = "tracking.json"
"""In the run directory: the MLflow and W&B run ids that `--resume` continues."""


def trackers(config: TuningConfig) -> list[str]:
    """The trackers `--report-to` asks for (none for `none`)."""
    return [name for name in config.report_to if name != "none"]


def logging_dir(config: TuningConfig) -> Path:
    return Path(config.logging_dir) if config.logging_dir else config.output_dir / "logs"


def run_name(config: TuningConfig) -> str:
    return config.run_name or config.output_dir.resolve().name


def log_with(config: TuningConfig) -> list[Any]:
    """What `Accelerator(log_with=...)` gets for `--report-to`: accelerate's tracker names, TensorBoard as
    accelerate's TensorBoardTracker writing to LOGGING_DIR/RUN_NAME (accelerate would name its directory
    after the project, which W&B and trackio take as the project) that drops the events after the
    checkpoint a resumed run restarts from.

    Raises MissingDependencyError, naming the pip extra, for a tracker whose package is not installed.
    """
    names = trackers(config)
    if not names:
        return []
    from accelerate.tracking import TensorBoardTracker, get_available_trackers

    available = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in available:
            raise MissingDependencyError(f"--report-to {name}: the {name} package is not installed; "
                                         f"pip install 'lorakit[{name.replace('_', '-')}]'")
    if "tensorboard" not in names:
        return names
    purge_step = saved_progress(config.output_dir / "checkpoint").step + 1 if config.resume else None
    tensorboard = TensorBoardTracker(run_name(config), logging_dir(config), purge_step=purge_step)
    return [tensorboard if name == "tensorboard" else name for name in names]


def hyperparameters(config: TuningConfig, command: str) -> dict[str, bool | int | float | str]:
    """The command and its resolved options (`to_options()`, flat names) as scalars: lists, mappings and
    None become JSON text, which every tracker takes."""
    options = {"command": command, **config.to_options()}
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in options.items()}


class Tracking:
    """A Trainer callback that sends the run to the trackers of `accelerator`, built with `log_with(config)`;
    constructing it starts them (main process only)."""

    def __init__(self, config: TuningConfig, accelerator: Accelerator, command: str) -> None:
        self.acc, self.out = accelerator, config.output_dir
        if not accelerator.is_main_process:
            return
        name, directory = run_name(config), logging_dir(config)
        directory.mkdir(parents=True, exist_ok=True)
        ids = _read_ids(self.out / IDS_FILE) if config.resume else {}
        init_kwargs = {
            "mlflow": {"run_name": name, "run_id": ids.get("mlflow")},
            "wandb": {"name": name, "dir": str(directory), **({"id": ids["wandb"], "resume": "allow"}
                                                              if "wandb" in ids else {})},
            "trackio": {"name": name, "resume": "allow" if config.resume else "never"},
        }
        # A resumed run has its hyper-parameters already (and MLflow refuses a changed one, like `resume`).
        values = None if config.resume else hyperparameters(config, command)
        try:
            accelerator.init_trackers(config.project, values, init_kwargs)
        except Exception as err:  # each tracker's own (not logged in, no server, ...): one line, no model yet
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise LorakitError(f"--report-to {','.join(trackers(config))}: a tracker did not start "
                               f"({type(err).__name__}: {reason})") from err
        atomic_write_text(self.out / IDS_FILE, json.dumps({**ids, **_run_ids(accelerator)}) + "\n")

    def on_record(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        values = {f"{kind}/{key}": value for key, value in record.items()
                  if key not in ("kind", "step") and isinstance(value, (int, float, str))}
        if kind == "train" and record.get("elapsed"):
            values["train/tokens_per_second"] = record["tokens"] / record["elapsed"]
        self.acc.log(values, step=record["step"])

    def on_end(self, report: dict[str, Any]) -> None:
        if not self.acc.is_main_process:
            return
        step = report.get("steps")
        self.acc.log({f"report/{k}": v for k, v in report.items() if isinstance(v, (int, float))}, step=step)
        # Each tracker is closed by hand: Accelerator.end_training would also end the process group, which
        # the Trainer still needs.
        for tracker in self.acc.trackers:
            if tracker.name in EXTRAS:
                EXTRAS[tracker.name](tracker, self.out, report, step)
            tracker.finish()


def _read_ids(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise LorakitError(f"{path}: not valid JSON; delete it to start new tracker runs") from None
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def _run_ids(accelerator: Accelerator) -> dict[str, str]:
    """The ids of the runs just started, for the trackers that can continue a run by id."""
    started = {tracker.name: tracker.tracker for tracker in accelerator.trackers}
    ids = {}
    if "mlflow" in started:
        ids["mlflow"] = started["mlflow"].info.run_id
    if "wandb" in started:
        ids["wandb"] = started["wandb"].id
    return ids


# ---- what the end of a run adds where the tracker takes it: the loss curve and the exact-match samples --


def _tensorboard_extras(tracker: Any, out: Path, report: dict[str, Any], step: int | None) -> None:
    png = out / "loss_curve.png"
    if png.is_file():
        import numpy as np
        from PIL import Image

        with Image.open(png) as image:
            pixels = np.asarray(image.convert("RGB"))
        tracker.log_images({"loss_curve": pixels[None]}, step=step, dataformats="NHWC")
    samples = report.get("exact_match_samples")
    if samples:
        tracker.log({"report/exact_match_samples": _markdown_table(samples)}, step=step)


def _wandb_extras(tracker: Any, out: Path, report: dict[str, Any], step: int | None) -> None:
    png = out / "loss_curve.png"
    if png.is_file():
        tracker.log_images({"loss_curve": [str(png)]}, step=step)
    samples = report.get("exact_match_samples")
    if samples:
        tracker.log_table("exact_match_samples", columns=list(samples[0]),
                          data=[list(row.values()) for row in samples], step=step)


def _mlflow_extras(tracker: Any, out: Path, report: dict[str, Any], step: int | None) -> None:
    """The plot and report.json (which holds the samples) as the run's artifacts."""
    for name in ("loss_curve.png", "report.json"):
        if (out / name).is_file():
            tracker.log_artifact(str(out / name))


EXTRAS: dict[str, Callable[[Any, Path, dict[str, Any], int | None], None]] = {
    "tensorboard": _tensorboard_extras, "wandb": _wandb_extras, "mlflow": _mlflow_extras,
}


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of equal keys as a Markdown table (TensorBoard renders text summaries as Markdown)."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (str(row[c]).replace("|", "\\|").replace("\n", " ") for c in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
