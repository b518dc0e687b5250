"""The parameters of every named query and the SQL signatures of its macros: one source.

Each named query (``actstore.queries.named``) is run two ways: by name
(:func:`~actstore.queries.run_named`, ``actstore query``) with keyword parameters,
and as a DuckDB table macro in SQL. Both take their parameters from
:data:`PARAMS` here, and each macro's signature is generated from them
(:class:`MacroForm`): required parameters first, positionally, in the query's
order, then the optional ones with their defaults (``name := default``; DuckDB also
accepts them positionally, in that order). A query may have more than one macro:
``trigger_diff`` with ``pair`` is the macro ``trigger_diff_paired``, whose result
has one more column (``n_pairs``), so it cannot share one table macro; and
``top_activations``' ``feature`` is ``feature_id`` in SQL, where ``feature`` is a
column of the macro's body.

Example
-------
>>> SIGNATURES["feature_density"]
'feature_density(run, sae, positions := NULL)'
>>> SIGNATURES["trigger_diff_paired"]
"trigger_diff_paired(run, sae, group_a, pair, group_b := NULL, positions := NULL, rank_by := 't')"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actstore.errors import InputError, SpecError
from actstore.store.ids import as_id

__all__ = [
    "FORMS",
    "PARAMS",
    "PARAM_TYPES",
    "SIGNATURES",
    "MacroForm",
    "QueryParam",
    "macro_help",
]

#: Parameter kinds: how a value is checked and converted.
PARAM_TYPES = ("run", "sae", "sql", "column", "int", "choice")


@dataclass(frozen=True, slots=True)
class QueryParam:
    """One parameter of a named query."""

    name: str
    """As in ``run_named(..., name=value)``, ``--param name=value`` and the macro."""
    type: str
    """One of :data:`PARAM_TYPES`: ``run`` (a run name or id), ``sae`` (an SAE name),
    ``sql`` (a SQL predicate or expression over ``labeled_tokens``), ``column`` (a
    column of ``labeled_tokens``), ``int``, ``choice`` (one of ``choices``)."""
    description: str
    """What it means, for ``actstore query --list``."""
    required: bool = False
    """Whether it must be given."""
    default: Any = None
    """The value when not given (None: not set)."""
    choices: tuple[str, ...] = ()
    """Allowed values of a ``choice``."""

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise SpecError(f"parameter {self.name!r}: type {self.type!r} not in {PARAM_TYPES}")
        if (self.type == "choice") != bool(self.choices) or (
            self.choices and self.default is not None and self.default not in self.choices
        ):
            raise SpecError(
                f"parameter {self.name!r}: a choice needs choices, including its default"
            )

    @property
    def sql_default(self) -> str:
        """The default as a SQL literal, for a macro signature.

        Example
        -------
        >>> QueryParam("k", "int", "how many", default=10).sql_default
        '10'
        """
        if self.default is None:
            return "NULL"
        if isinstance(self.default, str):
            return "'" + self.default.replace("'", "''") + "'"
        return str(self.default)

    def coerce(self, query: str, value: Any) -> Any:
        """Check and convert a given value (e.g. the string of ``--param k=17``).

        Example
        -------
        >>> QueryParam("k", "int", "how many").coerce("top_activations", "17")
        17
        """
        if value is None:
            return None
        where = f"{query}: parameter {self.name!r}"
        if self.type == "int":
            if isinstance(value, bool):
                raise InputError(f"{where} must be an integer, not {value!r}")
            try:
                return int(value)
            except (TypeError, ValueError):
                raise InputError(f"{where} must be an integer, not {value!r}") from None
        if self.type == "choice":
            if str(value) not in self.choices:
                raise InputError(f"{where} must be one of {list(self.choices)}, not {value!r}")
            return str(value)
        if self.type == "run" and as_id(value) is not None:
            return as_id(value)
        # the CLI parses `--param k=v` values as JSON: `true`, `3` arrive as bool, int
        if isinstance(value, bool) and self.type == "sql":
            value = "true" if value else "false"
        elif isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where} must be a non-empty string, not {value!r}")
        return value

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description.

        Example
        -------
        >>> QueryParam("k", "int", "how many", default=10).to_dict()["default"]
        10
        """
        return {
            "name": self.name,
            "type": self.type,
            "description": self.description,
            "required": self.required,
            "default": self.default,
            "choices": list(self.choices),
        }


@dataclass(frozen=True, slots=True)
class MacroForm:
    """A table macro of a named query: its name, and how its parameters differ."""

    name: str
    """The macro's SQL name."""
    drop: tuple[str, ...] = ()
    """Parameters of the query this macro does not take."""
    require: tuple[str, ...] = ()
    """Optional parameters of the query that this macro requires."""
    rename: tuple[tuple[str, str], ...] = ()
    """(query parameter, macro parameter) pairs where SQL needs another name: DuckDB
    refuses a macro parameter named like a column of the macro's body (``feature``)."""

    def sql_name(self, param: str) -> str:
        """The macro's name for the query parameter ``param``.

        Example
        -------
        >>> FORMS["top_activations"][0].sql_name("feature")
        'feature_id'
        """
        return dict(self.rename).get(param, param)

    def params(self, params: tuple[QueryParam, ...]) -> tuple[QueryParam, ...]:
        """The macro's parameters in signature order: required ones, then optional ones.

        Example
        -------
        >>> [p.name for p in MacroForm("x", drop=("pair",)).params(PARAMS["trigger_diff"])]
        ['run', 'sae', 'group_a', 'group_b', 'positions', 'rank_by']
        """
        kept = [p for p in params if p.name not in self.drop]
        req = [p for p in kept if p.required or p.name in self.require]
        return tuple(req + [p for p in kept if p not in req])

    def signature(self, params: tuple[QueryParam, ...]) -> str:
        """The SQL signature, e.g. ``feature_density(run, sae, positions := NULL)``.

        Example
        -------
        >>> MacroForm("feature_density").signature(PARAMS["feature_density"])
        'feature_density(run, sae, positions := NULL)'
        """
        args = [
            self.sql_name(p.name)
            if (p.required or p.name in self.require)
            else f"{self.sql_name(p.name)} := {p.sql_default}"
            for p in self.params(params)
        ]
        return f"{self.name}({', '.join(args)})"


_RUN = QueryParam("run", "run", "run name (or id)", required=True)
_SAE = QueryParam("sae", "sae", "SAE name (saes table)", required=True)
_POSITIONS = QueryParam(
    "positions",
    "sql",
    "which stored tokens count: a SQL predicate over labeled_tokens, e.g. "
    "\"position_role = 'last'\" (default: every stored token)",
)

#: The parameters of each named query, in the order ``run_named`` documents them.
PARAMS: dict[str, tuple[QueryParam, ...]] = {
    "trigger_diff": (
        _RUN,
        _SAE,
        QueryParam(
            "group_a",
            "sql",
            "group A: a boolean label column (e.g. triggered) or a SQL predicate over "
            "labeled_tokens",
            required=True,
        ),
        QueryParam("group_b", "sql", "group B (default: NOT group_a; NULL is in neither)"),
        _POSITIONS,
        QueryParam(
            "pair",
            "column",
            "pair id column: run the matched-pairs (paired t) test (SQL: trigger_diff_paired)",
        ),
        QueryParam("rank_by", "choice", "rank by |t| or by p", default="t", choices=("t", "p")),
    ),
    "top_activations": (
        _SAE,
        QueryParam("feature", "int", "feature index", required=True),
        QueryParam("k", "int", "how many tokens", default=10),
        QueryParam("run", "run", "only this run (default: every run with this SAE)"),
        QueryParam(
            "width",
            "int",
            "tokens of context on each side (the prompt's whole text is in prompt_text)",
            default=16,
        ),
        _POSITIONS,
    ),
    "feature_reward_corr": (
        _RUN,
        _SAE,
        QueryParam(
            "label",
            "sql",
            "numeric label column (e.g. reward) or SQL expression over labeled_tokens",
            required=True,
        ),
        QueryParam(
            "aggregate", "choice", "per-prompt aggregate", default="mean", choices=("mean", "max")
        ),
        _POSITIONS,
        QueryParam(
            "rank_by",
            "choice",
            "rank by |spearman_r| or |pearson_r|",
            default="spearman",
            choices=("spearman", "pearson"),
        ),
    ),
    "checkpoint_diff": (
        QueryParam("run_a", "run", "first run (e.g. the base checkpoint)", required=True),
        QueryParam("run_b", "run", "second run (e.g. the fine-tuned one)", required=True),
        _SAE,
        _POSITIONS,
    ),
    "feature_density": (_RUN, _SAE, _POSITIONS),
}

#: The table macros of each named query.
FORMS: dict[str, tuple[MacroForm, ...]] = {
    name: (MacroForm(name),) for name in PARAMS if name != "trigger_diff"
}
FORMS["top_activations"] = (MacroForm("top_activations", rename=(("feature", "feature_id"),)),)
FORMS["trigger_diff"] = (
    MacroForm("trigger_diff", drop=("pair",)),
    MacroForm("trigger_diff_paired", require=("pair",)),
)

#: The SQL signature of each table macro, by macro name.
SIGNATURES: dict[str, str] = {
    form.name: form.signature(PARAMS[query]) for query, forms in FORMS.items() for form in forms
}

#: The named query each macro runs.
QUERY_OF: dict[str, str] = {form.name: query for query, forms in FORMS.items() for form in forms}


def macro_help(macro: str) -> str | None:
    """The signatures of ``macro``'s named query (all its macros), or None if not a macro.

    Example
    -------
    >>> print(macro_help("checkpoint_diff"))
    checkpoint_diff(run_a, run_b, sae, positions := NULL)
    """
    query = QUERY_OF.get(macro)
    if query is None:
        return None
    return "; ".join(SIGNATURES[f.name] for f in FORMS[query])
