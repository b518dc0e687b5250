"""The bad-input catalogue: every kind of mistake is refused by the CLI in one line, naming the
thing at fault, with a non-zero exit status, and leaves every file of the stores byte-identical."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from actstore.cli import main
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from tests.ingest.test_runner import _save_tiny_sae, job_dict, make_prompts
from tests.queries.conftest import build_store


def toml_value(v) -> str:
    return json.dumps(v)


def to_toml(d: dict) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in d.items() if not isinstance(v, dict | list)]
    lines += [
        f"{k} = {toml_value(v)}"
        for k, v in d.items()
        if isinstance(v, list) and v and not isinstance(v[0], dict)
    ]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += [f"[{k}]"] + [f"{a} = {toml_value(b)}" for a, b in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines += [f"[[{k}]]"] + [f"{a} = {toml_value(b)}" for a, b in item.items()]
    return "\n".join(lines) + "\n"


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dirs: dict[str, Path]) -> dict:
    root = tmp_path_factory.mktemp("bad-inputs")
    llama = tiny_model_dirs["llama"]
    base = job_dict(root, llama, hooks=["blocks.1.hook_resid_post"])
    run_job(IngestJob.from_dict(base), quiet=True)
    qs = root / "qstore"
    build_store(qs, seed=7)
    newer = root / "newer"
    shutil.copytree(qs, newer)
    marker = json.loads((newer / "actstore.json").read_text())
    (newer / "actstore.json").write_text(json.dumps({**marker, "format_version": 99}))
    return {
        "root": root,
        "base": base,
        "llama": llama,
        "gpt2": tiny_model_dirs["gpt2"],
        "store": Path(base["store"]),
        "qs": qs,
        "newer": newer,
        "sae16": _save_tiny_sae(root / "sae16", "blocks.1.hook_resid_post", 16),
        "sae_l0": _save_tiny_sae(root / "sae_l0", "blocks.0.hook_resid_post", 32),
    }


def job(env: dict, name: str, edit: Callable[[dict], None] | None = None, text: str | None = None):
    d = json.loads(json.dumps(env["base"]))
    if edit:
        edit(d)
    path = env["root"] / f"{name}.toml"
    path.write_text(text if text is not None else to_toml(d))
    return str(path)


def prompts(env: dict, name: str, content: bytes) -> str:
    p = env["root"] / name
    p.write_bytes(content)
    return str(p)


def set_prompts(path: str, **extra):
    def edit(d):
        d["prompts"] = [{"name": extra.pop("name", "pairs"), "path": path, **extra}]

    return edit


def cap(**kw):
    return lambda d: d["capture"].update(kw)


# (name, argv builder, expected exit status, what the one line must contain)
CASES: list[tuple[str, Callable[[dict], list[str]], int, str]] = [
    (
        "malformed JSONL",
        lambda e: [
            "ingest",
            job(e, "a", set_prompts(prompts(e, "a.jsonl", b'{"prompt": "x"}\n{"prompt": \n'))),
        ],
        1,
        "a.jsonl:2: not valid JSON",
    ),
    (
        "missing text column",
        lambda e: ["ingest", job(e, "b", set_prompts(prompts(e, "b.jsonl", b'{"q": "x"}\n')))],
        1,
        "'prompt'",
    ),
    (
        "empty prompt set",
        lambda e: ["ingest", job(e, "c", set_prompts(prompts(e, "c.jsonl", b"\n")))],
        1,
        "empty",
    ),
    (
        "non-UTF-8 prompt file",
        lambda e: [
            "ingest",
            job(e, "d", set_prompts(prompts(e, "d.jsonl", b'{"prompt": "caf\xe9"}\n'))),
        ],
        1,
        "d.jsonl:1: byte 15 (0xe9) is not UTF-8",
    ),
    (
        "over-long prompt",
        lambda e: ["ingest", job(e, "e", cap(max_length=2))],
        1,
        "more than capture.max_length=2",
    ),
    (
        "unknown hook",
        lambda e: ["ingest", job(e, "f", cap(hooks=["blocks.0.hook_resid_mid"]))],
        1,
        "hook_resid_mid",
    ),
    (
        "layer out of range",
        lambda e: ["ingest", job(e, "g", cap(hooks=["blocks.7.hook_resid_post"]))],
        1,
        "layer 7 out of range",
    ),
    (
        "SAE width mismatch",
        lambda e: ["ingest", job(e, "h", lambda d: d.update(saes=[{"path": str(e["sae16"])}]))],
        1,
        "16",
    ),
    (
        "SAE hook not captured",
        lambda e: ["ingest", job(e, "i", lambda d: d.update(saes=[{"path": str(e["sae_l0"])}]))],
        1,
        "does not capture",
    ),
    (
        "unknown TOML key",
        lambda e: ["ingest", job(e, "j", cap(hookz=["x"]))],
        1,
        "unknown key 'hookz'",
    ),
    ("wrong type", lambda e: ["ingest", job(e, "k", cap(batch_size="many"))], 1, "batch_size"),
    ("negative batch size", lambda e: ["ingest", job(e, "l", cap(batch_size=-3))], 1, "batch_size"),
    (
        "store path that is a file",
        lambda e: ["ingest", job(e, "m", lambda d: d.update(store=prompts(e, "m.txt", b"x")))],
        1,
        "is a file",
    ),
    (
        "missing model directory",
        lambda e: [
            "ingest",
            job(e, "n", lambda d: d["model"].update(path=str(e["root"] / "nomodel"))),
        ],
        1,
        "nomodel",
    ),
    (
        "another architecture",
        lambda e: [
            "ingest",
            job(
                e,
                "o",
                lambda d: d.update(
                    checkpoints=[
                        {"label": "a", "path": str(e["llama"])},
                        {"label": "b", "path": str(e["gpt2"])},
                    ]
                ),
            ),
        ],
        1,
        "checkpoint 'b' is a gpt2",
    ),
    (
        "duplicate checkpoint labels",
        lambda e: [
            "ingest",
            job(
                e,
                "p",
                lambda d: d.update(
                    checkpoints=[
                        {"label": "a", "path": str(e["llama"])},
                        {"label": "a", "path": str(e["llama"])},
                    ]
                ),
            ),
        ],
        1,
        "'a'",
    ),
    (
        "--shard 3/2",
        lambda e: ["ingest", job(e, "q"), "--shard", "3/2"],
        1,
        "shard index 3 is outside 0-1 for 2 shards",
    ),
    ("invalid TOML", lambda e: ["ingest", job(e, "r", text="store = \n[model\n")], 1, "r.toml"),
    (
        "unknown positions policy",
        lambda e: ["ingest", job(e, "s", cap(positions=["middle"]))],
        1,
        "middle",
    ),
    (
        "run made by another job",
        lambda e: ["ingest", job(e, "t", cap(store_dtype="float16"))],
        1,
        "run 'main/pairs' already exists and was made by a different job",
    ),
    (
        "CUDA without CUDA",
        lambda e: ["ingest", job(e, "u", lambda d: d["model"].update(device="cuda"))],
        1,
        "CUDA is not available",
    ),
    (
        "prompt set with other contents",
        lambda e: [
            "ingest",
            job(e, "v", set_prompts(str(make_prompts(e["root"] / "v.jsonl", n=5, seed=9)))),
        ],
        1,
        "prompt set 'pairs' is already in the store with other contents",
    ),
    (
        "label clashing with a built-in column",
        lambda e: [
            "ingest",
            job(
                e,
                "w",
                set_prompts(prompts(e, "w.jsonl", b'{"prompt": "a b", "position": 1}\n'), name="w"),
            ),
        ],
        1,
        "['position'] clash with built-in columns",
    ),
    (
        "non-integer --batch-size",
        lambda e: ["ingest", job(e, "x"), "--batch-size", "x"],
        2,
        "'x' is not a valid integer; write a whole number",
    ),
    (
        "negative --batch-size",
        lambda e: ["ingest", job(e, "y"), "--batch-size", "-1"],
        1,
        "batch_size",
    ),
    (
        "edit naming an unknown hook",
        lambda e: [
            "edit",
            job(e, "z", cap(hooks=["blocks.9.hook_resid_post"])),
            prompts(
                e,
                "z_edit.toml",
                b'name = "e"\n[[ops]]\nkind = "steer"\nhook = "blocks.1.hook_resid_post"\ndirection = "dir"\nalpha = 1.0\n',
            ),
        ],
        1,
        "blocks.9",
    ),
    (
        "edit of an unknown kind",
        lambda e: [
            "edit",
            job(e, "z2"),
            prompts(e, "z2_edit.toml", b'name = "e"\n[[ops]]\nkind = "ablate"\n'),
        ],
        1,
        "op kind 'ablate' is not one of",
    ),
    ("a newer format version", lambda e: ["info", str(e["newer"])], 1, "99"),
    ("not a store", lambda e: ["info", str(e["root"] / "nowhere")], 1, "is not an actstore store"),
    (
        "unknown run",
        lambda e: ["query", str(e["qs"]), "feature_density", "-p", "run=nope", "-p", "sae=sae"],
        1,
        "run 'nope' not in store",
    ),
    (
        "unknown SAE",
        lambda e: ["query", str(e["qs"]), "feature_density", "-p", "run=base/p", "-p", "sae=nope"],
        1,
        "SAE 'nope' not in store",
    ),
    (
        "run without the SAE's features",
        lambda e: ["query", str(e["qs"]), "feature_density", "-p", "run=f32/p", "-p", "sae=sae"],
        1,
        "has no features of SAE 'sae'",
    ),
    ("unknown query", lambda e: ["query", str(e["qs"]), "nope"], 1, "no named query 'nope'"),
    (
        "unknown column",
        lambda e: [
            "query",
            str(e["qs"]),
            "trigger_diff",
            "-p",
            "run=base/p",
            "-p",
            "sae=sae",
            "-p",
            "group_a=trigered",
        ],
        1,
        "'trigered' is not a column of labeled_tokens",
    ),
    (
        "missing required parameter",
        lambda e: ["query", str(e["qs"]), "trigger_diff", "-p", "run=base/p", "-p", "sae=sae"],
        1,
        "parameter 'group_a' is required",
    ),
    (
        "unknown parameter",
        lambda e: [
            "query",
            str(e["qs"]),
            "feature_density",
            "-p",
            "run=base/p",
            "-p",
            "sae=sae",
            "-p",
            "colour=red",
        ],
        1,
        "unknown parameter(s) ['colour']",
    ),
    (
        "non-integer parameter",
        lambda e: [
            "query",
            str(e["qs"]),
            "top_activations",
            "-p",
            "sae=sae",
            "-p",
            "feature=seventeen",
        ],
        1,
        "parameter 'feature' must be an integer",
    ),
    (
        "choice out of range",
        lambda e: [
            "query",
            str(e["qs"]),
            "trigger_diff",
            "-p",
            "run=base/p",
            "-p",
            "sae=sae",
            "-p",
            "group_a=triggered",
            "-p",
            "rank_by=q",
        ],
        1,
        "must be one of ['t', 'p']",
    ),
    (
        "feature out of range",
        lambda e: ["query", str(e["qs"]), "top_activations", "-p", "sae=sae", "-p", "feature=64"],
        1,
        "feature 64 is outside SAE 'sae'",
    ),
    (
        "--param without =",
        lambda e: ["query", str(e["qs"]), "feature_density", "-p", "run"],
        2,
        "--param 'run' is not of the form KEY=VALUE",
    ),
    (
        "SQL injection through a name",
        lambda e: [
            "query",
            str(e["qs"]),
            "feature_density",
            "-p",
            "run=x' OR '1'='1",
            "-p",
            "sae=sae",
        ],
        1,
        "run \"x' OR '1'='1\" not in store",
    ),
    (
        "COPY through a predicate",
        lambda e: [
            "query",
            str(e["qs"]),
            "trigger_diff",
            "-p",
            "run=base/p",
            "-p",
            "sae=sae",
            "-p",
            f"group_a=true) TO '{e['root'] / 'pwned.csv'}' (FORMAT csv); SELECT (1",
        ],
        1,
        "group_a",
    ),
    (
        "file read through a predicate",
        lambda e: [
            "query",
            str(e["qs"]),
            "trigger_diff",
            "-p",
            "run=base/p",
            "-p",
            "sae=sae",
            "-p",
            "group_a=length(read_text('/etc/passwd')) > 0",
        ],
        1,
        "read_text",
    ),
    (
        "writes through actstore sql",
        lambda e: ["sql", str(e["qs"]), "DELETE FROM runs"],
        1,
        "read-only",
    ),
    (
        "DDL through actstore sql",
        lambda e: ["sql", str(e["qs"]), "CREATE TABLE cat.x (a INT)"],
        1,
        "read-only",
    ),
    ("SQL syntax error", lambda e: ["sql", str(e["qs"]), "SELEC 1"], 1, "SELEC"),
    ("unknown table", lambda e: ["sql", str(e["qs"]), "SELECT * FROM runz"], 1, "runz"),
    (
        "unknown analysis",
        lambda e: ["analyze", str(e["qs"]), "nope", "-p", "run=base/p"],
        1,
        "nope",
    ),
    (
        "unknown direction",
        lambda e: [
            "sql",
            str(e["qs"]),
            "SELECT project(run, 'blocks.0.hook_resid_post', \"row\", 'nodir') FROM labeled_tokens WHERE run = 'base/p'",
        ],
        1,
        "nodir",
    ),
    ("unknown command", lambda e: ["frobnicate"], 2, "No such command 'frobnicate'"),
]


def test_the_catalogue_is_complete():
    assert len(CASES) >= 47
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "argv", "status", "says"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(env, name, argv, status, says):
    stores = [env["store"], env["qs"], env["newer"]]
    before = [snapshot(s) for s in stores]
    res = CliRunner().invoke(main, argv(env))
    lines = res.output.strip().splitlines()
    assert res.exit_code == status, res.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert says in lines[0], lines[0]
    assert [snapshot(s) for s in stores] == before
    assert not (env["root"] / "pwned.csv").exists()
