"""``--wandb ENTITY/PROJECT``: a W&B project's runs through W&B's public API (``wandb.Api``:
``run.config``, ``run.summary``, ``run.scan_history``, ``run.state``).

Lightning gives W&B the model's and datamodule's hyperparameters flat (``optimizer``,
``schedule``, ``global_batch``, ...) and :class:`resnet_lamb.telemetry.RunStatus` adds the run's
``plan.json`` as the config key ``plan``; W&B holds no ``trainer.max_epochs`` nor ``expected``, so
such a run has no epoch count and no expected accuracy. A run whose W&B state is not
``finished`` is "in progress". No API key or no network is one error line (a UserError) within
about :data:`API_TIMEOUT_S` seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

from resnet_lamb.errors import UserError
from resnet_lamb.report.reading import History
from resnet_lamb.report.runs import TRUST_PREFIX, Run, read_model_and_data, set_progress

WANDB_STEP = "trainer/global_step"  # Lightning's step key in W&B history (the CSV's "step")
API_TIMEOUT_S = 10  # seconds per W&B API request


def _wandb_row(item: dict) -> dict:
    """A W&B history row (keys as logged) as a CSV-style row: Lightning's trainer/global_step is the
    CSV's ``step``; W&B's own ``_step``, ``_runtime``, ``_timestamp`` are dropped."""
    row = {k: v for k, v in item.items() if not k.startswith("_") and k != WANDB_STEP and v is not None}
    if item.get(WANDB_STEP) is not None:
        row["step"] = item[WANDB_STEP]
    return row


def config_from_wandb(run: Run, cfg: dict) -> None:
    """Optimizer, schedule, batch and plan from the config W&B recorded (flat hyperparameters; the
    ``model`` / ``data`` / ``trainer`` / ``expected`` sections when present, a config logged by
    hand). Without a ``plan`` key the run's plan numbers show as "-"."""
    model = cfg["model"] if isinstance(cfg.get("model"), dict) else cfg
    data = cfg["data"] if isinstance(cfg.get("data"), dict) else cfg
    trainer = cfg["trainer"] if isinstance(cfg.get("trainer"), dict) else {}
    if not isinstance(model.get("optimizer"), dict) or not isinstance(data.get("global_batch"), int):
        raise ValueError("the W&B config has no optimizer or global_batch (not a resnet-lamb run?)")
    read_model_and_data(run, model, data)
    run.max_epochs, run.max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    expected, plan = cfg.get("expected"), cfg.get("plan")
    run.expected = expected if isinstance(expected, dict) else {}
    run.plan = plan if isinstance(plan, dict) else None


def _short_error_text(err: BaseException) -> str:
    """The exception's message on one line, at most 300 characters (its type name when empty)."""
    return " ".join(str(err).split())[:300] or type(err).__name__


def wandb_api(project: str):
    """``wandb.Api`` with a short timeout; a UserError (one line: the problem and the fix) when no
    API key is configured or the server does not answer. Never prompts for a key."""
    fix = "run `wandb login` or set WANDB_API_KEY, or report local folders only (drop --wandb)"
    try:
        import wandb
    except ImportError as err:
        raise UserError(
            f"--wandb {project}: the wandb package cannot be imported ({_short_error_text(err)}); "
            f"`pip install wandb`, or report local folders only (drop --wandb)"
        ) from None
    base = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    try:  # wandb 0.31's own lookup (env, netrc, settings) without its interactive prompt
        from wandb.sdk.lib import wbauth
    except ImportError:  # another wandb layout: wandb.Api() decides (and may prompt on a terminal)
        pass
    else:
        try:
            auth = wbauth.authenticate_session(
                host=base, source="resnet-lamb report", no_offline=True, prompt=False, update_session=False
            )
        except Exception as err:  # noqa: BLE001 - a malformed key or netrc
            raise UserError(
                f"--wandb {project}: cannot use the W&B credentials for {base} ({_short_error_text(err)}); {fix}"
            ) from None
        if auth is None:
            raise UserError(f"--wandb {project}: no W&B API key configured for {base}; {fix}")
    try:
        return wandb.Api(timeout=API_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - wandb's CommError, AuthenticationError, ...
        raise UserError(
            f"--wandb {project}: the W&B API at {base} did not answer ({_short_error_text(err)}); "
            f"check the network and the key, {fix}"
        ) from None


def read_wandb_api(project: str, api=None) -> list:
    """Every run of W&B project ENTITY/PROJECT as a :class:`Run`: config (and plan) from
    ``run.config``, validation rows and trust-ratio rows from ``run.scan_history`` (two scans: it
    returns only the rows holding every key asked for), status from ``run.state``. A network or API
    failure is a UserError naming the project."""
    if project.count("/") != 1 or not all(project.split("/")):
        raise UserError(f"--wandb {project}: expected ENTITY/PROJECT, e.g. --wandb my-team/resnet-lamb")
    api = wandb_api(project) if api is None else api
    fetched = []
    try:  # the network part: plain data out of the API first
        for r in api.runs(project):
            summary = r.summary  # the last value of every key logged: which trust ratios exist
            keys = list(summary.keys())
            trust_keys = sorted(k for k in keys if k.startswith(TRUST_PREFIX))
            last = summary[WANDB_STEP] if WANDB_STEP in keys else None
            val = list(r.scan_history(keys=["epoch", WANDB_STEP, "val/top1", "val/top5"]))
            trust = list(r.scan_history(keys=[WANDB_STEP, *trust_keys])) if trust_keys else []
            fetched.append((r.name or r.id, r.id, r.state, dict(r.config), last, val + trust))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - wandb's CommError, requests', ...
        raise UserError(
            f"--wandb {project}: reading the runs failed ({_short_error_text(err)}); check the "
            "project name, the network and `wandb login` / WANDB_API_KEY, or report local folders "
            "only (drop --wandb)"
        ) from None
    runs = []
    for name, run_id, state, cfg, last, rows in fetched:
        run = Run(name=name, path=Path(f"wandb:{project}/{run_id}"), source=f"W&B API {project}")
        try:
            config_from_wandb(run, cfg)
            history = History()
            for row in sorted((_wandb_row(item) for item in rows), key=lambda row: row.get("step", -1)):
                history.add(row, f"W&B run {project}/{run_id}")
            last_step = history.finish(run)
        except ValueError as err:
            run.status, run.reason = "incomplete", str(err)
        else:
            set_progress(
                run,
                int(last) if isinstance(last, (int, float)) else last_step,
                None if state == "finished" else f"W&B state {state}",
            )
        runs.append(run)
    return runs
