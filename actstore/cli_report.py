"""``actstore report STORE -o DIR``: the store as a static, offline HTML site.

Example
-------
$ actstore report demo-out/store -o demo-out/report
"""

from __future__ import annotations

from pathlib import Path

import click

from actstore.errors import ActstoreError


@click.command()
@click.argument("store", type=click.STRING)
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The site's folder (new, empty, or an earlier report to update).",
)
@click.option(
    "--features",
    default=None,
    metavar="SQL",
    help="A query selecting the features that get pages (a `feature` column, and `sae` with "
    "several SAEs); default: the top trigger-differential features.",
)
@click.option("--n-features", default=8, show_default=True, help="At most this many feature pages.")
@click.option("--contexts", default=20, show_default=True, help="Top contexts per feature.")
@click.option(
    "--prompts",
    "prompts_per_set",
    default=6,
    show_default=True,
    help="Prompt pages per prompt set.",
)
@click.option(
    "--direction",
    default=None,
    help="The stored direction shading prompt pages (default: the one the latest edit used, "
    "else the mean difference with the best stored AUROC).",
)
def report(
    store: str,
    out_dir: Path,
    features: str | None,
    n_features: int,
    contexts: int,
    prompts_per_set: int,
    direction: str | None,
) -> None:
    """Write the store as a static HTML site: index, analyses, SAE features, prompts.

    The store is opened read-only; a rebuild rewrites only the pages that changed.

    Example: actstore report demo-out/store -o demo-out/report
    """
    from actstore.report import ReportOptions, build_report

    try:
        opts = ReportOptions(
            features=features,
            n_features=n_features,
            contexts=contexts,
            prompts_per_set=prompts_per_set,
            direction=direction,
        )  # as actstore.cli.user_errors (not imported: cli.py imports this module)
        click.echo(str(build_report(store, out_dir, opts)))
    except ActstoreError as e:
        raise click.ClickException(str(e)) from None


@click.command()
@click.argument("store", type=click.STRING)
@click.option("--port", default=8765, show_default=True, help="The port (0: any free one).")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="The address to listen on (default: this machine only).",
)
@click.option("--features", default=None, metavar="SQL", help="As for `actstore report`.")
@click.option("--n-features", default=8, show_default=True, help="At most this many feature pages.")
def serve(store: str, port: int, host: str, features: str | None, n_features: int) -> None:
    """Serve the report pages of a live store over HTTP, read-only, on localhost by default.

    Pages are brought up to date with the store when it has new commits.

    Example: actstore serve demo-out/store --port 8765
    """
    from actstore.report import ReportOptions
    from actstore.report.serve import make_server

    try:
        opts = ReportOptions(features=features, n_features=n_features)
        server = make_server(store, host=host, port=port, options=opts)
    except ActstoreError as e:
        raise click.ClickException(str(e)) from None
    h, p = server.server_address[:2]
    where = h.decode() if isinstance(h, bytes) else str(h)
    click.echo(f"serving the report of {store} at http://{where}:{p}/ (read-only; Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
