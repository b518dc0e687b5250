"""The SQL of the named feature queries: per-feature statistics over sparse rows.

SAE features are stored as ``(row, feature, value)`` nonzeros only, so every
statistic here is written to count the implicit zeros without materialising
them. For a feature in a group of ``n`` tokens of which ``k`` have a nonzero
value (mean ``m`` and sum of squared deviations ``ss`` among those ``k``):

* mean = ``k * m / n``, firing frequency = ``k / n``;
* sum of squared deviations over all ``n`` = ``ss + m^2 * k * (n - k) / n``
  (Chan's pairwise update with a block of ``n - k`` zeros): exact, and free of
  the cancellation that ``sum(x^2) - n * mean^2`` suffers;
* a feature that never fires has mean 0 and frequency 0 (never NULL); its test
  statistics are NULL (0/0), and it is left out of the multiple-testing count.

Each builder returns one SELECT whose inputs are SQL fragments, so the same
text serves the session's table macros (names resolved by subqueries, rows
selected through ``query()``) and :func:`actstore.queries.run_named` (ids and
values bound as parameters, features read from the native cache):

``sel``
    a relation of the selected token rows (columns depend on the query);
``src``
    a relation ``("row", feature, value)`` of the nonzeros of one (run, SAE);
``d_sae``
    a scalar: the SAE's number of features (every feature gets a result row).

Divisions that can be 0/0 are guarded so they give NULL, not NaN (DuckDB 2
follows IEEE: ``0/0`` is NaN, ``1/0`` infinity).

Speed: the per-(feature, group) aggregation over every nonzero is the bulk of the
work. DuckDB aggregates into a perfect hash table (an array indexed by the group
values, as ``numpy.bincount`` does) when it knows the groups' value ranges and
they fit in ``perfect_ht_threshold`` bits; :data:`PERFECT_HT_BITS` is what
``run_named`` sets for its queries (1.6x faster than DuckDB's default of 12 bits
for a 16k-feature SAE, measured on 50M nonzeros).

Example
-------
>>> sql = feature_density(sel=None, src="f", n_tokens="10", d_sae="4")
>>> import duckdb
>>> con = duckdb.connect()
>>> _ = con.execute("CREATE TABLE f AS SELECT * FROM (VALUES (0, 1, 2.0), (3, 1, 4.0)) v(row, feature, value)")
>>> [(r[0], r[3], r[4]) for r in con.sql(sql).fetchall()]
[(0, 0.0, 0.0), (1, 0.2, 0.6), (2, 0.0, 0.0), (3, 0.0, 0.0)]
"""

from __future__ import annotations

from actstore.queries.stats import bh_sql

__all__ = [
    "PERFECT_HT_BITS",
    "checkpoint_diff",
    "feature_density",
    "feature_reward_corr",
    "top_activations",
    "trigger_diff",
    "trigger_diff_paired",
]


#: ``perfect_ht_threshold`` for the named queries: 2^17 features x 2 groups (plus NULL
#: bits) fit; larger SAEs fall back to DuckDB's ordinary hash aggregation.
PERFECT_HT_BITS = 20


def _all_features(d_sae: str) -> str:
    return f"(SELECT unnest(range({d_sae}))::INTEGER AS feature)"


def _fail(cond: str, message_sql: str) -> str:
    """A scalar that raises ``message_sql`` (prefixed ``actstore: ``) when ``cond`` holds."""
    return f"CASE WHEN {cond} THEN error('actstore: ' || {message_sql}) END"


def _welch_columns() -> str:
    return """
        CASE WHEN se2 > 0 THEN diff / sqrt(se2)
             WHEN se2 = 0 AND diff <> 0 THEN sign(diff) * 'inf'::DOUBLE END AS t,
        CASE WHEN se2 > 0 THEN se2 * se2 / (
                 CASE WHEN n_a > 1 THEN (var_a / n_a) ** 2 / (n_a - 1) ELSE 0 END
               + CASE WHEN n_b > 1 THEN (var_b / n_b) ** 2 / (n_b - 1) ELSE 0 END) END AS df,
        CASE WHEN pooled > 0 THEN diff / sqrt(pooled)
             WHEN pooled = 0 AND diff <> 0 THEN sign(diff) * 'inf'::DOUBLE END AS cohens_d"""


def _rank_and_q(relation: str, rank_by: str, extra_cols: str) -> str:
    """Add BH q-values, rank by ``rank_by`` ('t': |t| descending, 'p': p ascending)."""
    return f"""
, pv AS (SELECT *, t_pvalue(t, df) AS p FROM {relation})
, qv AS ({bh_sql("p", "pv")})
SELECT row_number() OVER (
           ORDER BY CASE WHEN {rank_by} = 'p' THEN p END ASC NULLS LAST,
                    abs(t) DESC NULLS LAST, feature)::INTEGER AS rank,
       feature, mean_a, mean_b, diff, cohens_d, freq_a, freq_b, t, df, p, q{extra_cols}
FROM qv ORDER BY rank"""


def trigger_diff(*, sel: str, src: str, d_sae: str, rank_by: str) -> str:
    """Per feature: group A vs group B of tokens, Welch t-test, Cohen's d, BH q-values.

    Parameters
    ----------
    sel
        Relation ``("row", g)``: ``g`` 1 for group A, 0 for group B, NULL for neither.
    src, d_sae
        See the module docstring.
    rank_by
        SQL scalar, ``'t'`` or ``'p'``.

    Returns
    -------
    str
        Columns ``rank, feature, mean_a, mean_b, diff, cohens_d, freq_a, freq_b, t,
        df, p, q, n_a, n_b``; one row per feature of the SAE, ordered by rank.

    Example
    -------
    >>> "t_pvalue" in trigger_diff(sel="s", src="f", d_sae="16", rank_by="'t'")
    True
    """
    return f"""
WITH sel AS MATERIALIZED (SELECT s0."row", s0.g FROM ({sel}) s0 WHERE s0.g IS NOT NULL)
, n AS (
    SELECT count(*) FILTER (WHERE sel.g = 1)::DOUBLE AS n_a,
           count(*) FILTER (WHERE sel.g = 0)::DOUBLE AS n_b
    FROM sel)
, n_ok AS (
    SELECT n.*, {_fail("n.n_a = 0", "'group A selects no stored token; check the group and positions'")} AS _ea,
           {_fail("n.n_b = 0", "'group B selects no stored token; check the group and positions'")} AS _eb
    FROM n)
, nz AS (
    -- the CASE gives the planner g's range, so with the feature column's range it can
    -- aggregate into a perfect hash table (see PERFECT_HT_BITS)
    SELECT f.feature, CASE WHEN sel.g = 1 THEN 1 ELSE 0 END AS g, count(*)::DOUBLE AS k,
           avg(f.value::DOUBLE) AS m, var_pop(f.value::DOUBLE) * count(*) AS ss
    FROM {src} f JOIN sel ON f."row" = sel."row"
    GROUP BY f.feature, CASE WHEN sel.g = 1 THEN 1 ELSE 0 END)
, per AS (
    SELECT nz.feature,
           coalesce(max(nz.k) FILTER (WHERE nz.g = 1), 0) AS k_a,
           coalesce(max(nz.m) FILTER (WHERE nz.g = 1), 0) AS m_a,
           coalesce(max(nz.ss) FILTER (WHERE nz.g = 1), 0) AS ssz_a,
           coalesce(max(nz.k) FILTER (WHERE nz.g = 0), 0) AS k_b,
           coalesce(max(nz.m) FILTER (WHERE nz.g = 0), 0) AS m_b,
           coalesce(max(nz.ss) FILTER (WHERE nz.g = 0), 0) AS ssz_b
    FROM nz GROUP BY nz.feature)
, mom AS (
    SELECT a.feature, n_ok.n_a, n_ok.n_b,
           coalesce(per.k_a, 0) AS k_a, coalesce(per.k_b, 0) AS k_b,
           coalesce(per.k_a * per.m_a, 0) / n_ok.n_a AS mean_a,
           coalesce(per.k_b * per.m_b, 0) / n_ok.n_b AS mean_b,
           coalesce(per.ssz_a + per.m_a * per.m_a * per.k_a * (n_ok.n_a - per.k_a) / n_ok.n_a, 0) AS ss_a,
           coalesce(per.ssz_b + per.m_b * per.m_b * per.k_b * (n_ok.n_b - per.k_b) / n_ok.n_b, 0) AS ss_b
    FROM {_all_features(d_sae)} a LEFT JOIN per ON per.feature = a.feature CROSS JOIN n_ok
    WHERE n_ok._ea IS NULL AND n_ok._eb IS NULL)
, st AS (
    SELECT *, mean_a - mean_b AS diff, k_a / n_a AS freq_a, k_b / n_b AS freq_b,
           CASE WHEN n_a > 1 THEN ss_a / (n_a - 1) END AS var_a,
           CASE WHEN n_b > 1 THEN ss_b / (n_b - 1) END AS var_b,
           CASE WHEN n_a + n_b > 2 THEN (ss_a + ss_b) / (n_a + n_b - 2) END AS pooled
    FROM mom)
, se AS (SELECT *, var_a / n_a + var_b / n_b AS se2 FROM st)
, tests AS (SELECT *, {_welch_columns()} FROM se)
{_rank_and_q("tests", rank_by, ", n_a::BIGINT AS n_a, n_b::BIGINT AS n_b")}"""


def trigger_diff_paired(*, sel: str, src: str, d_sae: str, rank_by: str) -> str:
    """Per feature: paired t-test over matched pairs of (mean over A tokens - mean over B tokens).

    For each pair with tokens in both groups, a feature's pair difference is its
    mean over the pair's selected A tokens minus its mean over the pair's selected
    B tokens (zeros counted); the test is a one-sample t-test of those differences.
    ``mean_a`` and ``mean_b`` are means over pairs of the per-pair means, so
    ``diff = mean_a - mean_b``; ``cohens_d`` is d_z (mean difference over its
    standard deviation); ``freq_a`` / ``freq_b`` are token firing frequencies
    within the complete pairs.

    Parameters
    ----------
    sel
        Relation ``("row", g, pair)``.

    Returns
    -------
    str
        Columns of :func:`trigger_diff` plus ``n_pairs``.

    Example
    -------
    >>> "n_pairs" in trigger_diff_paired(sel="s", src="f", d_sae="16", rank_by="'t'")
    True
    """
    return f"""
WITH sel AS MATERIALIZED (
    SELECT s0."row", s0.g, s0.pair FROM ({sel}) s0 WHERE s0.g IS NOT NULL AND s0.pair IS NOT NULL)
, pn AS MATERIALIZED (
    SELECT sel.pair, count(*) FILTER (WHERE sel.g = 1)::DOUBLE AS na,
           count(*) FILTER (WHERE sel.g = 0)::DOUBLE AS nb
    FROM sel GROUP BY sel.pair HAVING na > 0 AND nb > 0)
, n AS (SELECT count(*)::DOUBLE AS n_pairs, coalesce(sum(pn.na), 0) AS n_a,
               coalesce(sum(pn.nb), 0) AS n_b FROM pn)
, n_ok AS (
    SELECT n.*, {_fail("n.n_pairs = 0", "'no pair has selected tokens in both groups; check the pair column, the groups and positions'")} AS _e
    FROM n)
, sp AS MATERIALIZED (
    SELECT sel."row", sel.g, sel.pair, pn.na, pn.nb FROM sel JOIN pn ON sel.pair = pn.pair)
, fp AS (
    SELECT f.feature, sp.pair,
           coalesce(sum(f.value::DOUBLE) FILTER (WHERE sp.g = 1), 0) / any_value(sp.na) AS ma,
           coalesce(sum(f.value::DOUBLE) FILTER (WHERE sp.g = 0), 0) / any_value(sp.nb) AS mb,
           count(*) FILTER (WHERE sp.g = 1) AS k_a, count(*) FILTER (WHERE sp.g = 0) AS k_b
    FROM {src} f JOIN sp ON f."row" = sp."row"
    GROUP BY f.feature, sp.pair)
, d AS MATERIALIZED (SELECT fp.feature, fp.ma, fp.mb, fp.ma - fp.mb AS d, fp.k_a, fp.k_b FROM fp)
, per AS (
    SELECT d.feature, sum(d.ma) AS s_a, sum(d.mb) AS s_b, sum(d.d) AS s_d,
           count(*)::DOUBLE AS kp, sum(d.k_a)::DOUBLE AS k_a, sum(d.k_b)::DOUBLE AS k_b
    FROM d GROUP BY d.feature)
, mom AS MATERIALIZED (
    SELECT a.feature, n_ok.n_pairs, n_ok.n_a, n_ok.n_b,
           coalesce(per.s_a, 0) / n_ok.n_pairs AS mean_a,
           coalesce(per.s_b, 0) / n_ok.n_pairs AS mean_b,
           coalesce(per.s_d, 0) / n_ok.n_pairs AS diff,
           coalesce(per.kp, 0) AS kp,
           coalesce(per.k_a, 0) / n_ok.n_a AS freq_a, coalesce(per.k_b, 0) / n_ok.n_b AS freq_b
    FROM {_all_features(d_sae)} a LEFT JOIN per ON per.feature = a.feature CROSS JOIN n_ok
    WHERE n_ok._e IS NULL)
, dev AS (
    SELECT d.feature, sum((d.d - mom.diff) ** 2) AS ss_nz
    FROM d JOIN mom ON d.feature = mom.feature GROUP BY d.feature)
, st AS (
    SELECT mom.*,
           coalesce(dev.ss_nz, 0) + (mom.n_pairs - mom.kp) * mom.diff * mom.diff AS ss_d
    FROM mom LEFT JOIN dev ON dev.feature = mom.feature)
, sd AS (SELECT *, CASE WHEN n_pairs > 1 THEN ss_d / (n_pairs - 1) END AS var_d FROM st)
, tests AS (
    SELECT *,
        CASE WHEN var_d > 0 THEN diff / sqrt(var_d / n_pairs)
             WHEN var_d = 0 AND diff <> 0 THEN sign(diff) * 'inf'::DOUBLE END AS t,
        CASE WHEN var_d > 0 THEN n_pairs - 1 END AS df,
        CASE WHEN var_d > 0 THEN diff / sqrt(var_d)
             WHEN var_d = 0 AND diff <> 0 THEN sign(diff) * 'inf'::DOUBLE END AS cohens_d
    FROM sd)
{_rank_and_q("tests", rank_by, ", n_a::BIGINT AS n_a, n_b::BIGINT AS n_b, n_pairs::BIGINT AS n_pairs")}"""


def feature_reward_corr(*, sel: str, src: str, d_sae: str, aggregate: str, rank_by: str) -> str:
    """Per feature: Pearson and Spearman correlation of a per-prompt aggregate with a label.

    Each prompt with at least one selected token contributes one point: the
    feature's mean (or max) over the prompt's selected tokens, zeros counted,
    and the prompt's label. Spearman uses average ranks for ties (all the
    prompts where a feature is zero tie). p-values are two-sided, from
    ``t = r sqrt((n - 2) / (1 - r^2))`` with ``n - 2`` degrees of freedom, as scipy;
    q-values are BH over the features with a defined correlation.

    Parameters
    ----------
    sel
        Relation ``("row", prompt_idx, y)`` with ``y`` the (numeric) label.
    aggregate
        SQL scalar, ``'mean'`` or ``'max'``.
    rank_by
        SQL scalar, ``'spearman'`` or ``'pearson'`` (by |r|, descending).

    Returns
    -------
    str
        Columns ``rank, feature, pearson_r, pearson_p, pearson_q, spearman_r,
        spearman_p, spearman_q, mean, prompt_freq, n_prompts``.

    Example
    -------
    >>> "spearman_q" in feature_reward_corr(sel="s", src="f", d_sae="8", aggregate="'mean'",
    ...                                     rank_by="'spearman'")
    True
    """
    return f"""
WITH sel AS MATERIALIZED (
    SELECT s0."row", s0.prompt_idx, s0.y::DOUBLE AS y FROM ({sel}) s0 WHERE s0.y IS NOT NULL)
, pr AS MATERIALIZED (
    SELECT sel.prompt_idx, count(*)::DOUBLE AS n_tok, avg(sel.y) AS y FROM sel GROUP BY sel.prompt_idx)
, ys AS (
    SELECT count(*)::DOUBLE AS n, avg(pr.y) AS ybar, var_pop(pr.y) * count(*) AS ss_y FROM pr)
, ys_ok AS (
    SELECT ys.*, {_fail("ys.n < 3", "'fewer than 3 prompts have selected tokens and a label; a correlation needs at least 3'")} AS _e
    FROM ys)
, yr AS MATERIALIZED (
    SELECT pr.prompt_idx, pr.n_tok, pr.y - ys_ok.ybar AS yc,
           rank() OVER (ORDER BY pr.y) + (count(*) OVER (PARTITION BY pr.y) - 1) / 2.0
             - (ys_ok.n + 1) / 2.0 AS ryc
    FROM pr CROSS JOIN ys_ok WHERE ys_ok._e IS NULL)
, rys AS (SELECT sum(yr.ryc * yr.ryc) AS ss_ry FROM yr)
, fp AS (
    SELECT f.feature, sel.prompt_idx, sum(f.value::DOUBLE) AS sv, max(f.value::DOUBLE) AS mx,
           count(*) AS k
    FROM {src} f JOIN sel ON f."row" = sel."row"
    GROUP BY f.feature, sel.prompt_idx)
, e AS MATERIALIZED (
    SELECT * FROM (
        SELECT fp.feature, yr.yc, yr.ryc,
               CASE WHEN {aggregate} = 'max'
                    THEN CASE WHEN fp.k < yr.n_tok THEN greatest(fp.mx, 0) ELSE fp.mx END
                    ELSE fp.sv / yr.n_tok END AS x
        FROM fp JOIN yr ON fp.prompt_idx = yr.prompt_idx) x0
    WHERE x0.x <> 0)
, pe AS (
    SELECT e.feature, count(*)::DOUBLE AS k, avg(e.x) AS m, var_pop(e.x) * count(*) AS ss,
           sum(e.x * e.yc) AS sxy, count(*) FILTER (WHERE e.x < 0)::DOUBLE AS kneg
    FROM e GROUP BY e.feature)
, er AS (
    SELECT e.feature, e.x, e.ryc,
           rank() OVER (PARTITION BY e.feature ORDER BY e.x)
             + (count(*) OVER (PARTITION BY e.feature, e.x) - 1) / 2.0 AS r_nz
    FROM e)
, sr AS (
    SELECT er.feature,
           sum((er.r_nz + CASE WHEN er.x > 0 THEN ys.n - pe.k ELSE 0 END - (ys.n + 1) / 2.0) * er.ryc) AS s_rr,
           sum((er.r_nz + CASE WHEN er.x > 0 THEN ys.n - pe.k ELSE 0 END - (ys.n + 1) / 2.0) ** 2) AS ss_rnz,
           sum(er.ryc) AS s_ryc
    FROM er JOIN pe ON pe.feature = er.feature CROSS JOIN ys
    GROUP BY er.feature)
, mom AS (
    SELECT a.feature, ys.n, ys.ss_y, rys.ss_ry,
           coalesce(pe.k, 0) AS k,
           coalesce(pe.k * pe.m, 0) / ys.n AS mean,
           coalesce(pe.ss + pe.m * pe.m * pe.k * (ys.n - pe.k) / ys.n, 0) AS ss_x,
           coalesce(pe.sxy, 0) AS sxy,
           coalesce(pe.kneg, 0) + (ys.n - coalesce(pe.k, 0) + 1) / 2.0 - (ys.n + 1) / 2.0 AS z_rc,
           coalesce(sr.s_rr, 0) AS s_rr, coalesce(sr.ss_rnz, 0) AS ss_rnz,
           coalesce(sr.s_ryc, 0) AS s_ryc
    FROM {_all_features(d_sae)} a LEFT JOIN pe ON pe.feature = a.feature
    LEFT JOIN sr ON sr.feature = a.feature CROSS JOIN ys CROSS JOIN rys)
, rr AS (
    SELECT *,
        CASE WHEN ss_x > 0 AND ss_y > 0 THEN greatest(-1.0, least(1.0, sxy / sqrt(ss_x * ss_y))) END AS pearson_r,
        CASE WHEN ss_rnz + (n - k) * z_rc * z_rc > 0 AND ss_ry > 0
             THEN greatest(-1.0, least(1.0, (s_rr - z_rc * s_ryc)
                  / sqrt((ss_rnz + (n - k) * z_rc * z_rc) * ss_ry))) END AS spearman_r
    FROM mom)
, tt AS (
    SELECT *,
        CASE WHEN abs(pearson_r) = 1 THEN sign(pearson_r) * 'inf'::DOUBLE
             ELSE pearson_r * sqrt((n - 2) / (1 - pearson_r * pearson_r)) END AS t_p,
        CASE WHEN abs(spearman_r) = 1 THEN sign(spearman_r) * 'inf'::DOUBLE
             ELSE spearman_r * sqrt((n - 2) / (1 - spearman_r * spearman_r)) END AS t_s
    FROM rr)
, pv AS (SELECT *, t_pvalue(t_p, n - 2) AS pearson_p, t_pvalue(t_s, n - 2) AS spearman_p FROM tt)
, q1 AS ({bh_sql("pearson_p", "pv", q="pearson_q")})
, q2 AS ({bh_sql("spearman_p", "q1", q="spearman_q")})
SELECT row_number() OVER (
           ORDER BY abs(CASE WHEN {rank_by} = 'pearson' THEN pearson_r ELSE spearman_r END)
                    DESC NULLS LAST, feature)::INTEGER AS rank,
       feature, pearson_r, pearson_p, pearson_q, spearman_r, spearman_p, spearman_q,
       mean, k / n AS prompt_freq, n::BIGINT AS n_prompts
FROM q2 ORDER BY rank"""


def checkpoint_diff(*, sel_a: str, sel_b: str, src_a: str, src_b: str, d_sae: str) -> str:
    """Per feature: mean activation and firing frequency in run A and run B, and the change.

    Parameters
    ----------
    sel_a, sel_b
        Relations ``("row")`` of the selected tokens of each run (the same prompts).
    src_a, src_b
        The feature nonzeros of each run (same SAE).

    Returns
    -------
    str
        Columns ``rank, feature, mean_a, mean_b, diff, freq_a, freq_b, freq_diff, n_a,
        n_b``; ``diff = mean_b - mean_a`` (the change from A to B), ranked by |diff|.

    Example
    -------
    >>> "freq_diff" in checkpoint_diff(sel_a="a", sel_b="b", src_a="fa", src_b="fb", d_sae="8")
    True
    """
    return f"""
WITH sa AS MATERIALIZED ({sel_a})
, sb AS MATERIALIZED ({sel_b})
, n AS (SELECT (SELECT count(*) FROM sa)::DOUBLE AS n_a, (SELECT count(*) FROM sb)::DOUBLE AS n_b)
, n_ok AS (
    SELECT n.*, {_fail("n.n_a = 0 OR n.n_b = 0", "'the selection has no stored token in one of the runs; check positions and that both runs cover the same prompts'")} AS _e
    FROM n)
, fa AS (SELECT f.feature, count(*)::DOUBLE AS k, sum(f.value::DOUBLE) AS s
         FROM {src_a} f JOIN sa ON f."row" = sa."row" GROUP BY f.feature)
, fb AS (SELECT f.feature, count(*)::DOUBLE AS k, sum(f.value::DOUBLE) AS s
         FROM {src_b} f JOIN sb ON f."row" = sb."row" GROUP BY f.feature)
, m AS (
    SELECT a.feature, n_ok.n_a, n_ok.n_b,
           coalesce(fa.s, 0) / n_ok.n_a AS mean_a, coalesce(fb.s, 0) / n_ok.n_b AS mean_b,
           coalesce(fa.k, 0) / n_ok.n_a AS freq_a, coalesce(fb.k, 0) / n_ok.n_b AS freq_b
    FROM {_all_features(d_sae)} a LEFT JOIN fa ON fa.feature = a.feature
    LEFT JOIN fb ON fb.feature = a.feature CROSS JOIN n_ok WHERE n_ok._e IS NULL)
SELECT row_number() OVER (ORDER BY abs(mean_b - mean_a) DESC, feature)::INTEGER AS rank,
       feature, mean_a, mean_b, mean_b - mean_a AS diff, freq_a, freq_b, freq_b - freq_a AS freq_diff,
       n_a::BIGINT AS n_a, n_b::BIGINT AS n_b
FROM m ORDER BY rank"""


def feature_density(*, sel: str | None, src: str, n_tokens: str, d_sae: str) -> str:
    """Per feature: how often it fires and how strongly, over the selected tokens.

    Parameters
    ----------
    sel
        Relation ``("row")`` of the selected tokens, or None for every stored token
        (then ``n_tokens`` must be their count).
    n_tokens
        SQL scalar: the number of tokens when ``sel`` is None (ignored otherwise).

    Returns
    -------
    str
        Columns ``feature, n_tokens, n_fired, freq, mean, mean_active, max``,
        ordered by feature. ``mean`` counts zeros; ``mean_active`` is the mean
        over the tokens where it fires (NULL if it never does); ``max`` includes
        the zeros.

    Example
    -------
    >>> "mean_active" in feature_density(sel=None, src="f", n_tokens="10", d_sae="4")
    True
    """
    if sel is None:
        n_sql = f"SELECT ({n_tokens})::DOUBLE AS n"
        agg_from = f"{src} f"
    else:
        n_sql = "SELECT count(*)::DOUBLE AS n FROM sel"
        agg_from = f'{src} f JOIN sel ON f."row" = sel."row"'
    sel_cte = f"sel AS MATERIALIZED ({sel}), " if sel is not None else ""
    return f"""
WITH {sel_cte}n AS ({n_sql})
, n_ok AS (SELECT n.*, {_fail("n.n = 0", "'the selection has no stored token; check run and positions'")} AS _e FROM n)
, agg AS (
    SELECT f.feature, count(*)::DOUBLE AS k, sum(f.value::DOUBLE) AS s, max(f.value::DOUBLE) AS mx
    FROM {agg_from} GROUP BY f.feature)
SELECT a.feature, n_ok.n::BIGINT AS n_tokens, coalesce(agg.k, 0)::BIGINT AS n_fired,
       coalesce(agg.k, 0) / n_ok.n AS freq, coalesce(agg.s, 0) / n_ok.n AS mean,
       CASE WHEN agg.k > 0 THEN agg.s / agg.k END AS mean_active,
       CASE WHEN coalesce(agg.k, 0) < n_ok.n THEN greatest(coalesce(agg.mx, 0), 0)
            ELSE agg.mx END AS max
FROM {_all_features(d_sae)} a LEFT JOIN agg ON agg.feature = a.feature CROSS JOIN n_ok
WHERE n_ok._e IS NULL
ORDER BY a.feature"""


#: The result columns of :func:`top_activations` before the prompt's labels.
TOP_COLUMNS = (
    "rank",
    "run",
    "prompt_idx",
    "position",
    "row",
    "token",
    "value",
    "left_tokens",
    "right_tokens",
    "context",
    "prompt_text",
)
_TOP_FIXED = ", ".join(f"'{c}'" for c in (*TOP_COLUMNS, "_ps", "_pls", "_pli"))


def top_activations(*, src: str, sel: str | None, feature: str, k: str, width: str) -> str:
    """The ``k`` tokens where a feature is largest, with ``width`` tokens of context each side.

    Parameters
    ----------
    src
        Relation ``(run_id, "row", feature, value)`` (one SAE, any runs).
    sel
        Relation ``(run_id, "row")`` of the allowed tokens, or None for all.
    feature, k, width
        SQL scalars.

    Returns
    -------
    str
        Columns ``rank, run, prompt_idx, position, row, token, value, left_tokens,
        right_tokens, context`` (``context`` marks the token as ``[[token]]``),
        ``prompt_text`` (the prompt's whole text) and then the prompt's label
        columns (``triggered``, ...; NULL where the run's prompt set lacks one).

    Example
    -------
    >>> "right_tokens" in top_activations(src="f", sel=None, feature="3", k="5", width="4")
    True
    """
    join = "" if sel is None else 'JOIN sel ON sel.run_id = f.run_id AND sel."row" = f."row"'
    sel_cte = "" if sel is None else f"sel AS MATERIALIZED ({sel}), "
    return f"""
WITH {sel_cte}top AS (
    SELECT f.run_id, f."row", f.value::DOUBLE AS value
    FROM {src} f {join}
    WHERE f.feature = {feature}
    ORDER BY f.value DESC, f.run_id, f."row" LIMIT {k})
, focus AS (
    SELECT top.run_id, top."row", top.value, t.prompt_idx, t.position, t.token_text
    FROM top JOIN tokens t ON t.run_id = top.run_id AND t."row" = top."row")
, ctx AS (
    SELECT fo.run_id, fo."row",
           list(c.token_text ORDER BY c.position) FILTER (WHERE c.position < fo.position) AS lt,
           list(c.token_text ORDER BY c.position) FILTER (WHERE c.position > fo.position) AS rt
    FROM focus fo JOIN tokens c
      ON c.run_id = fo.run_id AND c.prompt_idx = fo.prompt_idx
     AND c.position BETWEEN fo.position - {width} AND fo.position + {width}
    GROUP BY fo.run_id, fo."row")
, out AS (
SELECT row_number() OVER (ORDER BY fo.value DESC, fo.run_id, fo."row")::INTEGER AS rank,
       r.name AS run, fo.prompt_idx, fo.position, fo."row", fo.token_text AS token, fo.value,
       coalesce(ctx.lt, []::VARCHAR[]) AS left_tokens, coalesce(ctx.rt, []::VARCHAR[]) AS right_tokens,
       trim(array_to_string(coalesce(ctx.lt, []::VARCHAR[]), ' ') || ' [[' || coalesce(fo.token_text, '')
            || ']] ' || array_to_string(coalesce(ctx.rt, []::VARCHAR[]), ' ')) AS context,
       r.prompt_set_id AS _ps
FROM focus fo JOIN ctx ON ctx.run_id = fo.run_id AND ctx."row" = fo."row"
JOIN runs r ON r.run_id = fo.run_id)
-- the prompt's text and labels; a label named like a result column is left out
SELECT out.* EXCLUDE (_ps), pl.prompt_text,
       COLUMNS(lambda c: c NOT IN ({_TOP_FIXED}))
FROM out LEFT JOIN (
    SELECT p0.prompt_set_id AS _pls, p0.prompt_idx AS _pli, p0.text AS prompt_text,
           p0.* EXCLUDE (prompt_set_id, prompt_idx, text) FROM prompts p0) pl
  ON pl._pls = out._ps AND pl._pli = out.prompt_idx
ORDER BY rank"""
