"""One command that checks a GPU machine before the first real run (``bash scripts/gpu_check.sh``).

Each check runs in its own process with its own time limit (all of them fit in 8 minutes on one
GPU) and reports one JSON object; the last line of the output is one JSON object with every
result, the checks skipped (and why) and ``ok``. Exit status 0 when every check that ran held.

Checks (``--only a,b`` runs a subset):

- ``optim``: LAMB and LARS (paper mode) on CUDA, ``impl: compiled`` (flat buffers, one compiled graph per phase)
  against ``impl: eager``, on ResNet-50's 161 parameter tensors and the same gradients, 3 steps:
  largest relative difference per tensor (must be <= 1e-5); then step time (median of 20) beside
  torch's fused AdamW and fused SGD with momentum on the same tensors. GPU only.
- ``dali_decode``: the DALI training loader on generated JPEGs (500 x 375, ImageNet's typical
  size) for 3 epochs: img/s, and after each epoch the GPU memory in use (``cudaMemGetInfo``), the
  process's resident memory, child processes and threads; it must hold one pipeline, no child
  process, and memory and threads must not grow after the first epoch (a leak check). On a CPU it
  runs in DALI's CPU-only mode on small images.
- ``resnet50_fit``: `resnet-lamb fit` of ResNet-50 on synthetic data, bf16-mixed, channels_last,
  micro batch 256, 224 px, 200 optimizer steps (LAMB eager: the compiled step is the optim
  check's); img/s (median over the last 100 steps) beside
  NVIDIA's published figure for one A100 80GB with mixed precision (2,470 img/s: NVIDIA
  DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "Training
  performance: NVIDIA DGX A100 (8x A100 80GB)", pytorch-21.03 NGC container, real data through
  DALI). GPU only.
- ``dali_fit_resume``: a short DALI fit (ResNet-18, 64 px, generated JPEGs, deterministic kernels
  where torch has them) launched by ``launch/torchrun.sh`` (one worker; on a GPU bound to its NUMA
  node's CPUs with ``NUMA_BINDING=exclusive``), sent SIGUSR1 once epoch 0 is saved, resumed with
  ``--ckpt_path last``, against the same fit never stopped: weights and optimizer state must be
  bit-identical (if not, two runs never stopped are compared too, to tell nondeterministic GPU
  kernels from a resume error). Runs on a CPU too (DALI CPU mode).
- ``ddp_equivalence``: with N > 1 GPUs, the same global batch as 1 process x accumulation N and as
  N processes x accumulation 1 (torchrun, NCCL, fp32): trainable weights within 1e-4 (relative).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NVIDIA_A100_AMP_IMG_S = 2470  # see the module docstring for the source
# seconds per check: the first four sum to under 8 minutes, the most one GPU takes (ddp_equivalence is
# skipped there in seconds)
LIMITS = {"optim": 180, "dali_decode": 50, "resnet50_fit": 110, "dali_fit_resume": 130, "ddp_equivalence": 150}


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _skip(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


# ------------------------------------------------------------------------------------------ optim
def check_optim() -> dict:
    import torch
    import torchvision

    from resnet_lamb.optim import Lamb, Lars

    if not torch.cuda.is_available():
        return _skip("no CUDA device")
    dev = torch.device("cuda")
    base = [p.detach().to(dev) for p in torchvision.models.resnet50().parameters()]
    gen = torch.Generator(device=dev).manual_seed(0)
    grads = [[torch.randn(p.shape, device=dev, generator=gen) * 1e-2 for p in base] for _ in range(3)]

    def run(make, steps=3):
        ps = [torch.nn.Parameter(p.clone()) for p in base]
        opt = make(ps)
        for s in range(steps):
            for p, g in zip(ps, grads[s % 3]):
                p.grad = g.clone()
            opt.step()
        return ps, opt

    makers = {
        "lamb": lambda impl: (lambda ps: Lamb(ps, lr=1e-2, weight_decay=0.01, impl=impl)),
        "lars": lambda impl: (lambda ps: Lars(ps, lr=1.0, momentum=0.9, weight_decay=1e-4, impl=impl)),
    }
    out: dict = {"status": "pass", "tensors": len(base), "params": sum(p.numel() for p in base)}
    for name, make in makers.items():
        t0 = time.perf_counter()
        compiled, _ = run(make("compiled"))
        torch.cuda.synchronize()
        out[f"{name}_first_steps_s"] = round(time.perf_counter() - t0, 1)  # compile included
        eager, _ = run(make("eager"))
        worst = max(float((a - b).norm() / b.norm().clamp(min=1e-30)) for a, b in zip(compiled, eager))
        out[f"{name}_compiled_vs_eager_max_rel"] = worst
        if not worst <= 1e-5:
            out["status"] = "fail"
    contenders = {
        "lamb_compiled": makers["lamb"]("compiled"),
        "lamb_eager": makers["lamb"]("eager"),
        "lars_compiled": makers["lars"]("compiled"),
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
        "sgd_fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True),
    }
    times = {}
    for name, make in contenders.items():
        ps, opt = run(make, steps=3)  # warm (compiled graphs cached)
        samples = []
        for _ in range(20):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
        times[name] = statistics.median(samples) * 1e3
    out["step_ms"] = {k: round(v, 3) for k, v in times.items()}
    out["lamb_compiled_over_adamw_fused"] = round(times["lamb_compiled"] / times["adamw_fused"], 2)
    out["lars_compiled_over_sgd_fused"] = round(times["lars_compiled"] / times["sgd_fused"], 2)
    return out


# ------------------------------------------------------------------------------------- DALI decode
def make_jpegs(root: Path, width: int, height: int, per_class: int, classes: int = 8) -> Path:
    """Smooth random JPEGs in the ImageNet layout (benchmarks/throughput.py's generator)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from throughput import make_folder

    return make_folder(root, width, height, per_class, classes)


def _children() -> int:
    me = str(os.getpid())
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    count += f.read().rsplit(")", 1)[1].split()[1] == me
            except OSError:
                pass
    return count


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def check_dali_decode() -> dict:
    import threading

    import torch

    from resnet_lamb.data import ImageDataModule
    from resnet_lamb.data import dali as dali_mod

    if not dali_mod.available():
        return _skip("nvidia-dali not installed")
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        size, per_class, batch, image = ((500, 375), 128, 128, 224) if gpu else ((160, 120), 24, 32, 64)
        root = make_jpegs(Path(tmp) / "data", *size, per_class=per_class)
        dm = ImageDataModule(backend="dali", root=str(root), global_batch=batch, micro_batch=batch, image_size=image,
                             workers=min(8, os.cpu_count() or 1), dtype="bfloat16" if gpu else "float32",
                             channels_last=gpu)
        dm.setup("fit")
        loader = dm.train_dataloader()
        before = dali_mod.PIPELINES_BUILT
        epochs = []
        for _ in range(3):
            t0, n = time.perf_counter(), 0
            for x, y in loader:
                n += len(y)
            if gpu:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            used = None
            if gpu:
                free, total = torch.cuda.mem_get_info()
                used = round((total - free) / 2**20)
            epochs.append({"img_s": round(n / seconds, 1), "gpu_used_mb": used, "rss_mb": round(_rss_mb()),
                           "children": _children(), "threads": threading.active_count()})
        built = dali_mod.PIPELINES_BUILT - before
        dm.teardown("fit")
    first, last = epochs[0], epochs[-1]
    ok = built == 1 and all(e["children"] == 0 for e in epochs) and last["threads"] <= first["threads"]
    ok = ok and last["rss_mb"] <= first["rss_mb"] * 1.1 + 64
    if gpu:
        ok = ok and last["gpu_used_mb"] <= first["gpu_used_mb"] + 256
    return {"status": "pass" if ok else "fail", "device": "mixed" if gpu else "cpu", "image": list(size),
            "batch": batch, "pipelines_built": built, "epochs": epochs,
            "img_s": max(e["img_s"] for e in epochs[1:])}


# --------------------------------------------------------------------------------- ResNet-50 fit
def _fit(args: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    py = sys.executable
    return subprocess.run([py, "-m", "resnet_lamb", "fit", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, WANDB_MODE="offline", **(env or {})))


def _rows(run: Path) -> list[dict]:
    import csv

    with open(run / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_resnet50_fit() -> dict:
    import torch

    if not torch.cuda.is_available():
        return _skip("no CUDA device")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        p = _fit(["--config", "recipes/imagenet/table5/lamb-bs512.yaml", "--run.root", tmp, "--run.name", "r50",
                  "--run.wandb", "false", "--data.backend", "synthetic", "--data.global_batch", "256",
                  "--data.micro_batch", "256", "--trainer.max_steps", "200", "--trainer.devices", "1",
                  "--trainer.precision", "bf16-mixed", "--trainer.log_every_n_steps", "10",
                  # the optimizer's compile time and step time are the optim check's: keep this one short
                  "--model.optimizer.kwargs", '{"betas": [0.9, 0.999], "eps": 1.0e-6, "impl": "eager"}',
                  "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "false",
                  "--trainer.enable_progress_bar", "false"], timeout=LIMITS["resnet50_fit"] - 10)
        if p.returncode:
            return {"status": "fail", "reason": p.stderr.strip().splitlines()[-1:] or ["exit status"]}
        rates = [float(r["train/img_per_s"]) for r in _rows(Path(tmp) / "r50") if r.get("train/img_per_s")]
    rate = statistics.median(rates[len(rates) // 2:])
    return {"status": "pass", "gpu": torch.cuda.get_device_name(0), "img_s": round(rate, 1), "optimizer": "lamb eager",
            "nvidia_a100_80gb_amp_img_s": NVIDIA_A100_AMP_IMG_S,
            "nvidia_source": "NVIDIA DeepLearningExamples ConvNets resnet50v1.5 README (1x A100 80GB, AMP); "
                             "not measured here"}


# ------------------------------------------------------------------------------ DALI fit + resume
def _differing(a: dict, b: dict) -> list[str]:
    import torch

    out = [k for k, v in b["state_dict"].items() if not torch.equal(a["state_dict"][k], v)]
    for i, state in b["optimizer_states"][0]["state"].items():
        out += [f"optimizer {i}.{k}" for k, t in state.items()
                if torch.is_tensor(t) and not torch.equal(a["optimizer_states"][0]["state"][i][k], t)]
    return out


def fit_overrides(root, run_root) -> list[str]:
    """The dali_fit_resume check's command line after the recipe (recipes/demo.yaml): a small DALI fit
    on the generated JPEGs (tests/test_gpu_check.py checks that fit accepts it)."""
    return ["--data.root", str(root), "--run.root", str(run_root), "--run.wandb", "false", "--data.backend", "dali",
            "--data.image_size", "64", "--data.global_batch", "32", "--data.micro_batch", "16",
            "--data.num_classes", "8", "--trainer.max_epochs", "2",
            # warn: adaptive average pooling's CUDA backward has no deterministic kernel
            "--trainer.deterministic", "warn", "--trainer.enable_progress_bar", "false"]


def check_dali_fit_resume() -> dict:
    import torch

    from resnet_lamb.data import dali as dali_mod

    if not dali_mod.available():
        return _skip("nvidia-dali not installed")
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = make_jpegs(Path(tmp) / "data", 96, 72, per_class=48 if gpu else 12)  # 12 or 3 steps per epoch
        # through launch/torchrun.sh as on a cluster: one worker, bound to its GPU's NUMA node (exclusive
        # CPUs, which the DALI loader pins its threads to), SIGUSR1 forwarded by torchrun
        overrides = fit_overrides(root, tmp)
        env = dict(os.environ, WANDB_MODE="offline", CUBLAS_WORKSPACE_CONFIG=":4096:8", OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1", NPROC="1", PYTHON=sys.executable, NUMA_BINDING="exclusive" if gpu else "none")

        def launch(name: str, **kw):
            return subprocess.Popen(["bash", "launch/torchrun.sh", "recipes/demo.yaml", *overrides, "--run.name", name],
                                    cwd=REPO, env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)

        last = Path(tmp) / "stopped" / "checkpoints" / "last.ckpt"
        proc = launch("stopped")
        deadline = time.time() + LIMITS["dali_fit_resume"] / 3
        while proc.poll() is None and not last.exists() and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGUSR1)  # epoch 0 is saved: the run is validating or in epoch 1
        _, err = proc.communicate(timeout=120)
        if "stopped after optimizer step" not in err:
            return {"status": "fail", "reason": f"the signalled fit (exit {proc.returncode}) did not stop on "
                                                f"SIGUSR1: {err.strip()[-300:]}"}
        stopped_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
        for name in ("stopped", "straight", "again"):  # torchrun.sh resumes "stopped" (--ckpt_path last)
            p = launch(name)
            _, err = p.communicate(timeout=300)
            if p.returncode:
                return {"status": "fail", "reason": f"fit {name}: {err.strip()[-300:]}"}
            ckpt = torch.load(Path(tmp) / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
            if name == "stopped":
                resumed = ckpt
            elif name == "straight":
                straight = ckpt
                differ = _differing(resumed, straight)
                if not differ:
                    break
            else:  # the resume differs: are two runs never stopped the same? (nondeterministic kernels)
                baseline = _differing(ckpt, straight)
    out = {"status": "pass" if not differ and resumed["global_step"] == straight["global_step"] else "fail",
           "device": "mixed" if gpu else "cpu", "launcher": "torchrun.sh NPROC=1"
           + (" NUMA_BINDING=exclusive" if gpu else ""), "stopped_at_step": stopped_at,
           "steps": straight["global_step"], "tensors_differing": len(differ), "first_differing": differ[:3]}
    if differ:
        out["tensors_differing_between_two_straight_runs"] = len(baseline)
    return out


# ----------------------------------------------------------------------------------- 1xN vs Nx1
def check_ddp_equivalence() -> dict:
    n = _gpus()
    if n < 2:
        return _skip(f"{n} GPU(s): needs 2 or more")
    import torch

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        common = ["--config", "recipes/imagenet/table5/lamb-bs512.yaml", "--run.root", tmp, "--run.wandb", "false",
                  "--model.arch", "resnet18", "--data.backend", "synthetic", "--data.image_size", "64",
                  "--data.global_batch", str(32 * n), "--data.micro_batch", "32", "--data.train_images", str(32 * n * 5),
                  "--data.val_images", str(32 * n), "--trainer.max_epochs", "1", "--trainer.precision", "32-true",
                  "--trainer.deterministic", "true", "--model.grad_clip_norm", "null",
                  "--trainer.enable_progress_bar", "false"]
        env = dict(os.environ, WANDB_MODE="offline", CUBLAS_WORKSPACE_CONFIG=":4096:8")
        one = subprocess.run([sys.executable, "-m", "resnet_lamb", "fit", *common, "--run.name", "one",
                              "--trainer.devices", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        many = subprocess.run(["bash", "launch/torchrun.sh", common[1], *common[2:], "--run.name", "many"], cwd=REPO,
                              env=dict(env, NPROC=str(n)), capture_output=True, text=True, timeout=300)
        if one.returncode or many.returncode:
            return {"status": "fail", "reason": (one.stderr or many.stderr).strip()[-300:]}
        a = torch.load(Path(tmp) / "one" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        b = torch.load(Path(tmp) / "many" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    skip = ("running_mean", "running_var", "num_batches_tracked")
    worst = max(float((a["state_dict"][k].double() - v.double()).norm() / v.double().norm().clamp(min=1e-30))
                for k, v in b["state_dict"].items() if not k.endswith(skip))
    return {"status": "pass" if worst <= 1e-4 else "fail", "gpus": n, "max_rel_diff": worst}


CHECKS = {"optim": check_optim, "dali_decode": check_dali_decode, "resnet50_fit": check_resnet50_fit,
          "dali_fit_resume": check_dali_fit_resume, "ddp_equivalence": check_ddp_equivalence}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(CHECKS), help="comma-separated checks: " + ", ".join(CHECKS))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one check in this process, print its JSON
    args = ap.parse_args()
    if args.one:
        try:
            result = CHECKS[args.one]()
        except Exception as err:  # noqa: BLE001 - a check that crashes failed; say how
            result = {"status": "fail", "reason": f"{type(err).__name__}: {str(err)[:300]}"}
        print(json.dumps(result), flush=True)
        return 0
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"gpu_check: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    import torch

    # on a CPU the checks that run do so in DALI's CPU mode, slower than on a GPU: more time, no 8-minute aim
    scale = 1 if torch.cuda.is_available() else 3
    t0, results = time.time(), {}
    for name in names:
        t1 = time.time()
        # its own process group: a check over its limit is ended with every process it started
        p = subprocess.Popen([sys.executable, __file__, "--one", name], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = p.communicate(timeout=LIMITS[name] * scale)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            results[name] = json.loads(lines[-1]) if lines else {
                "status": "fail", "reason": f"exit {p.returncode}: {err.strip()[-300:]}"}
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            results[name] = {"status": "fail", "reason": f"over its {LIMITS[name] * scale} s limit"}
        results[name]["seconds"] = round(time.time() - t1, 1)
        print(f"gpu_check: {name}: {results[name]['status']} ({results[name]['seconds']} s) "
              f"{json.dumps({k: v for k, v in results[name].items() if k not in ('status', 'seconds')})}",
              flush=True)
    summary = {
        "check": "gpu_check", "ok": all(r["status"] != "fail" for r in results.values()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "ran": [n for n, r in results.items() if r["status"] != "skipped"],
        "skipped": {n: r["reason"] for n, r in results.items() if r["status"] == "skipped"},
        "failed": [n for n, r in results.items() if r["status"] == "fail"],
        "seconds": round(time.time() - t0, 1), "results": results,
    }
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
