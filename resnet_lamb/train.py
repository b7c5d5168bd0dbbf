"""`resnet-lamb fit|validate`: LightningCLI over :class:`resnet_lamb.model.LambModule` and
:class:`resnet_lamb.data.ImageDataModule`.

    resnet-lamb fit --config RECIPE [--config OVERRIDE.yaml] [--section.key value ...]
    resnet-lamb fit --config RECIPE --run.name NAME --ckpt_path last      # resume
    resnet-lamb validate --config RECIPE --ckpt_path runs/NAME/checkpoints/last.ckpt

What happens, in order:
1. The first ``--config`` is the recipe: its ``base:`` chain is merged by
   :func:`resnet_lamb.recipe.load_recipe` and the merged file handed to jsonargparse; later
   ``--config`` files and ``--key value`` flags override it.  ``expected`` is accepted.
2. Before torch or Lightning is imported, :func:`resnet_lamb.startup.check_config` checks the
   recipe with the command line applied (:func:`resnet_lamb.recipe.apply_overrides`): the recipe,
   the data folder and its counts (every mismatch in one line), the class count, the plan (when the
   world size is known without torch) and ``--ckpt_path`` against the run folder; an error a flag or a later
   ``--config`` file caused names it (:func:`resnet_lamb.recipe.blame`).  Not for ``--help`` /
   ``--print_config``.
3. An unknown key is found by :func:`resnet_lamb.recipe.check_keys` against every option of the
   subcommand before jsonargparse parses (worded as ``plan`` words it); any other parse error (a
   wrong type for one of LightningCLI's own options) is one line ``resnet-lamb: error: ...`` naming
   the key, exit 2, before anything is built.  ``model.num_classes`` is linked to ``data.num_classes``
   (counted from the folder when null).
4. The parsed config goes through ``check_config`` again and the plan is derived by
   :func:`resnet_lamb.recipe.derive_plan` with the world size (``WORLD_SIZE`` from torchrun,
   else devices x num_nodes); ``trainer.max_steps`` and ``trainer.accumulate_grad_batches`` come
   from the plan (an inexact accumulation is an error here), the plan is printed (not again under
   launch/torchrun.sh, which printed it); the counts used are recorded in ``config.yaml``.
   ``--print_config`` prints the config with these numbers (and only the schedule keys its
   schedule reads) and exits, writing nothing.
5. Precision: bf16-mixed on GPUs with bf16, 16-mixed on older ones, 32-true on CPU, and cuDNN's
   autotuner on GPUs, unless the recipe says otherwise
   (:func:`resnet_lamb.lightning_cli.device_defaults`); DDPStrategy with gradient buckets as views
   for ``ddp`` or several devices (:func:`resnet_lamb.lightning_cli.ddp_strategy`).
6. Run folder ``<run.root>/<run.name>/`` (name defaults to the recipe's file stem):
   ``config.yaml`` (the full resolved config), ``csv/metrics.csv`` (always), ``wandb/`` (W&B;
   offline when ``WANDB_MODE=offline``, when no API key is configured or when the server does not
   answer a 5 s connection check, made through ``HTTPS_PROXY`` unless ``NO_PROXY`` exempts the
   host), ``checkpoints/`` (``last.ckpt`` every ``run.checkpoint_every_n_epochs`` epochs, after a
   SIGUSR1/SIGTERM mid-epoch, and the best by ``val/top1`` as a hard link to it; each written to a
   temp file in the same folder, fsynced and ``os.replace``d; a write that fails on an OSError (disk
   full) stops the run with one line, the older files intact). A run folder that
   cannot be written is one line before anything is built.
7. ``fit`` start-up: temp files of an interrupted checkpoint write (``checkpoints/.tmp-*.ckpt``)
   are removed; ``--ckpt_path last`` for a run folder without ``last.ckpt`` is refused with one
   line naming the runs that can resume, unless ``--run.fresh_if_missing true`` (then it starts
   from scratch); ``--ckpt_path`` resuming with another recipe (optimizer, schedule, global batch or
   epochs, :func:`resnet_lamb.checkpoints.check_resume`) is refused with one line naming the keys
   unless ``--run.force_resume true``; another world size or micro batch is fine (same global batch).

Where each part lives: :mod:`resnet_lamb.startup` (the checks of steps 1-2 and 4, before torch and
Lightning are imported), :mod:`resnet_lamb.cli_parser` (step 3, ``--help``, ``--print_config``),
:mod:`resnet_lamb.lightning_cli` (the LightningCLI: steps 4-6), :mod:`resnet_lamb.checkpoints`
(checkpoint IO, the checkpoint callback, step 7's resume policy), :mod:`resnet_lamb.run_logging`
(CSV and W&B loggers), :mod:`resnet_lamb.lightning_internals` (the few reads and edits of
Lightning's loop state).
"""

from __future__ import annotations

import sys
import tempfile

from resnet_lamb.errors import UserError
from resnet_lamb.startup import (
    ARGV,
    FOLDERS,
    RECIPE,
    check_config,
    expand_recipe,
    known_world_size,
    quiet_libraries,
    take_print_config,
)


def main(argv: list[str] | None = None) -> int:
    """Entry of the dispatcher: ``main(["fit", *args])`` / ``main(["validate", *args])``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("fit", "validate"):
        raise UserError("usage: resnet-lamb fit|validate --config RECIPE [--key value ...]")
    quiet_libraries(argv[0])
    argv = [argv[0], *take_print_config(argv[1:])]
    ARGV[:] = argv
    RECIPE.update(path=None, config=None, origins={})
    FOLDERS.clear()
    with tempfile.TemporaryDirectory(prefix="resnet-lamb-") as tmp:
        expanded, merged, overrides = expand_recipe(argv[1:], tmp)
        if not {"-h", "--help"} & {a.split("=", 1)[0] for a in argv}:  # also without a recipe: flags only
            from resnet_lamb.recipe import apply_overrides

            cfg, RECIPE["origins"] = apply_overrides(merged, overrides)
            RECIPE["config"] = cfg  # its keys checked against LightningCLI's before it parses
            # recipe, data and run-folder errors before torch and Lightning are imported
            check_config(cfg, argv[0], known_world_size(cfg.get("trainer")))
        from resnet_lamb.lightning_cli import run  # torch, Lightning, the model and the data

        run([argv[0], *expanded])
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m resnet_lamb.train fit ...`
    sys.exit(main())
