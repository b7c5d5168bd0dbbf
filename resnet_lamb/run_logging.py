"""What a run logs to, and what it keeps off the console.

* :func:`wandb_mode`: W&B online, or offline (one line says why) when no API key is configured or
  the server does not answer a 5 s connection check (made through ``HTTPS_PROXY`` unless
  ``NO_PROXY`` exempts the host); ``WANDB_MODE`` wins.
* :class:`AppendingCSVLogger`: Lightning's CSVLogger keeping an existing ``metrics.csv`` (a resumed
  run appends to it).  :func:`wandb_logger`: the WandbLogger of a run folder (its id kept in
  ``wandb/run_id`` so that a resume continues the same W&B run).

Imported by the CLI after the start-up checks: it imports Lightning.
"""

from __future__ import annotations

import csv
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def _wandb_host(url: str):
    from urllib.parse import urlparse

    return urlparse(url if "//" in url else "https://" + url)


def _wandb_key_configured(url: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        if os.path.isfile(path):
            return netrc.netrc(path).authenticators(_wandb_host(url).hostname) is not None
    except Exception:  # noqa: BLE001 - an unreadable netrc means no key
        return False
    return False


def _wandb_url() -> str:
    """The W&B server: WANDB_BASE_URL, else the installed wandb's default."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    try:
        import wandb

        return str(wandb.Settings().base_url)
    except Exception:  # noqa: BLE001
        return "https://api.wandb.ai"


def _wandb_route(url: str) -> tuple[str, int]:
    """Where a connection to the W&B server goes first: the proxy that ``HTTPS_PROXY`` / ``HTTP_PROXY``
    (either case) names for the server's scheme, unless ``NO_PROXY`` exempts the host (as wandb's own
    HTTP client does), else the server itself."""
    import urllib.request

    u = _wandb_host(url)
    target = (u.hostname or "", u.port or (80 if u.scheme == "http" else 443))
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(u.scheme)
    # in CPython's urllib.request (undocumented), absent from typeshed's stub
    if proxy and not urllib.request.proxy_bypass_environment(target[0], proxies):  # type: ignore[attr-defined]
        p = _wandb_host(proxy)
        return p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    return target


def _wandb_reachable(url: str, timeout: float = 5.0) -> bool:
    """A TCP connect to the server, or to the proxy the environment routes it through: wandb.init
    would otherwise wait up to its init_timeout (90 s) and then fail the run on a machine without
    internet."""
    import socket

    try:
        with socket.create_connection(_wandb_route(url), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def wandb_mode() -> str:
    """Honour WANDB_MODE; with it unset and no API key, or a key but no route to the W&B server,
    go offline (one line says so)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    sync = "(sync later with `wandb sync runs/<name>/wandb/offline-run-*`)"
    url = _wandb_url()
    say = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank decides, rank 0 says it once
    if not _wandb_key_configured(url):
        os.environ["WANDB_MODE"] = "offline"
        if say:
            print(f"resnet-lamb: no W&B API key configured; logging to W&B offline {sync}", file=sys.stderr)
        return "offline"
    if not _wandb_reachable(url):
        os.environ["WANDB_MODE"] = "offline"
        if say:
            print(f"resnet-lamb: W&B server {url} unreachable; logging to W&B offline {sync}", file=sys.stderr)
        return "offline"
    return "online"


class AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (Lightning deletes it): a resumed run appends to it, and
    rows of the killed attempt from the resumed step on are dropped (they were redone)."""

    _trimmed = False

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])
        else:
            self._trimmed = True

    def save(self) -> None:
        if self.metrics and not self._trimmed and self._fs.isfile(self.metrics_file_path):
            first = min(int(m.get("step", 0)) for m in self.metrics)
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                rows = [r for r in csv.DictReader(f) if not r.get("step") or int(float(r["step"])) < first]
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.metrics_keys)
                w.writeheader()
                w.writerows(rows)
        if self.metrics:  # a save with nothing buffered (Lightning makes some) has no step to trim from
            self._trimmed = True
        super().save()


class AppendingCSVLogger(CSVLogger):
    """CSVLogger writing through :class:`AppendingWriter`."""

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_logger(run_dir: Path, cfg: Any, resume: bool) -> WandbLogger:
    """The run folder's W&B logger; a resume continues the W&B run of ``wandb/run_id``."""
    mode = wandb_mode()
    id_file = run_dir / "wandb" / "run_id"
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
    if run_id is None:
        run_id = secrets.token_hex(4)
    if int(os.environ.get("RANK", "0")) == 0:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    logger = WandbLogger(
        project=cfg.run.project,
        name=cfg.run.name,
        save_dir=str(run_dir),
        tags=list(cfg.run.tags or []),
        id=run_id,
        resume="allow",
        offline=(mode == "offline"),
    )
    # Lightning 2.6 always passes anonymous=None to wandb.init, which wandb 0.31 answers with "The
    # anonymous setting has no effect and will be removed"; leaving the key out changes nothing else
    logger._wandb_init.pop("anonymous", None)
    return logger
