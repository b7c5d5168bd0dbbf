"""Checks launch/torchrun.sh runs before torchrun starts a single worker; prints the plan.

    python launch/preflight.py RECIPE [CLI overrides...]      (environment: see launch/torchrun.sh)

1. The recipe with the command line's overrides applied (``--config EXTRA.yaml`` files and
   ``--section.key value`` / ``--section.key=value`` flags, as `resnet-lamb fit` will see them),
   checked by :func:`resnet_lamb.recipe.validate_recipe`; its plan derived for the world size
   ``NPROC x NNODES`` and printed (world size, micro batch, accumulation, steps). An inexact
   accumulation is one line ``resnet-lamb: error: ...`` naming the numbers.
2. ``--trainer.devices`` / ``--trainer.num_nodes`` given on the command line must agree with
   ``NPROC`` / ``NNODES`` (Lightning requires devices x num_nodes = torchrun's world size);
   ``NPROC`` may not exceed the visible GPUs.
3. ``STAGE_DIR`` set: the recipe's ``data.root`` (a shard set) is copied there by
   :func:`resnet_lamb.data.stage.stage` (this script runs once per node, before the node's workers
   start; a copy already complete is not repeated), and torchrun.sh trains on ``STAGE_DIR``.
4. A node that does not host the rendezvous (``NODE_RANK`` > 0, or unset and the endpoint is not
   this machine) waits at most ``RDZV_TIMEOUT`` seconds for the endpoint to accept a TCP
   connection, then fails with one line naming it (instead of torchrun's traceback).

Exit status 0 when torchrun may start, 2 (one line on stderr) when not.
"""
from __future__ import annotations

import os
import socket
import sys
import time


PREFIX = "torchrun.sh: error:"


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def parse_overrides(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """``(extra --config files, {dotted key: raw value})`` from the CLI overrides, last one wins (the
    device flags; the recipe takes them all through :func:`resnet_lamb.recipe.apply_overrides`)."""
    from resnet_lamb.recipe import command_line_flags

    configs, flags = [], {}
    for key, value in command_line_flags(args):
        if key == "config":
            configs.append(value)
        else:
            flags[key] = value
    return configs, flags


def _as_int(value, flag: str) -> int | None:
    if value is None or value == "auto":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        if isinstance(value, (list, tuple)):
            return len(value)
        if isinstance(value, str) and "," in value:
            return len([v for v in value.split(",") if v.strip()])
        fail(f"{flag} {value!r}: expected an integer")


def check_devices(flags: dict[str, str], nproc: int, nnodes: int, gpus: int) -> None:
    from resnet_lamb.recipe import parse_value

    devices = _as_int(parse_value(flags["trainer.devices"]), "--trainer.devices") \
        if "trainer.devices" in flags else nproc
    nodes = _as_int(parse_value(flags["trainer.num_nodes"]), "--trainer.num_nodes") \
        if "trainer.num_nodes" in flags else nnodes
    if devices is not None and nodes is not None and (devices, nodes) != (nproc, nnodes):
        fail(f"--trainer.devices {devices} x --trainer.num_nodes {nodes} = {devices * nodes}, but torchrun starts "
             f"NPROC x NNODES = {nproc} x {nnodes} = {nproc * nnodes} processes; Lightning needs them equal: "
             f"drop the --trainer.devices/--trainer.num_nodes overrides (torchrun.sh sets them) or set NPROC/NNODES")
    if gpus > 0 and nproc > gpus:
        fail(f"NPROC={nproc} but this node has {gpus} visible GPU(s); set NPROC <= {gpus}")


def _is_local(host: str) -> bool:
    if host in ("localhost", "") or host.startswith("127.") or host == "::1":
        return True
    names = {socket.gethostname(), socket.getfqdn()}
    if host in names:
        return True
    try:
        mine = {a[4][0] for n in names for a in socket.getaddrinfo(n, None)}
        theirs = {a[4][0] for a in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(mine & theirs)


def check_rendezvous(endpoint: str, nnodes: int, node_rank: str, timeout: float) -> None:
    if nnodes <= 1 or not endpoint:
        return
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        fail(f"RDZV_ENDPOINT={endpoint!r}: expected HOST:PORT")
    host = host.strip("[]")
    hosting = (node_rank == "0") if node_rank != "" else _is_local(host)
    if hosting:
        return
    deadline, err = time.monotonic() + timeout, None
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, max(timeout, 0.1))):
                return
        except OSError as exc:
            err = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    fail(f"RDZV_ENDPOINT={endpoint}: unreachable after {timeout:g} s ({err.strerror or err}); node 0 hosts the "
         f"rendezvous there: start it first, check the host and port (and firewall), or raise RDZV_TIMEOUT")


def main(argv: list[str]) -> int:
    if not argv:
        fail("usage: launch/torchrun.sh RECIPE [CLI overrides...]")
    recipe_path, rest = argv[0], argv[1:]
    env = os.environ
    nproc, nnodes, gpus = int(env.get("NPROC", "1")), int(env.get("NNODES", "1")), int(env.get("GPUS", "0"))
    if nproc < 1 or nnodes < 1:
        fail(f"NPROC={nproc} NNODES={nnodes}: both must be positive integers")
    from resnet_lamb.errors import RecipeError, UserError
    from resnet_lamb.recipe import apply_overrides, blame, format_plan, load_recipe, plan_recipe, recipe_part, \
        validate_recipe

    _, flags = parse_overrides(rest)
    check_devices(flags, nproc, nnodes, gpus)
    world, origins = nproc * nnodes, {}
    try:
        cfg, origins = apply_overrides(load_recipe(recipe_path), rest)
        recipe = validate_recipe(recipe_part(cfg), recipe_path)
        plan = plan_recipe(recipe, world_size=world)
    except UserError as err:
        msg = blame(str(err), recipe_path, origins) if isinstance(err, RecipeError) else str(err)
        print(f"resnet-lamb: error: {msg}", file=sys.stderr, flush=True)
        return 2
    print(f"torchrun.sh: {nnodes} node(s) x {nproc} process(es) = world size {world} "
          f"({'GPU' if gpus else 'CPU, gloo'}); micro batch {plan.micro_batch}, accumulation {plan.accumulation}, "
          f"{plan.optimizer_steps} optimizer steps", flush=True)
    print(format_plan(plan, recipe), flush=True)
    if env.get("STAGE_DIR"):
        from resnet_lamb.data.stage import main as stage_main

        root = (cfg.get("data") or {}).get("root")
        if not root:
            fail("STAGE_DIR is set but the recipe has no data.root to copy there")
        try:
            stage_main([str(root), env["STAGE_DIR"]])
        except UserError as err:
            print(f"resnet-lamb: error: {err}", file=sys.stderr, flush=True)
            return 2
    check_rendezvous(env.get("RDZV_ENDPOINT", ""), nnodes, env.get("NODE_RANK", ""),
                     float(env.get("RDZV_TIMEOUT", "300")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
