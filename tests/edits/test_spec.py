"""Edit specs: TOML and dict round trips, path resolution, and every validation error."""

from __future__ import annotations

import pytest

from actstore.edits import EditOp, EditSpec
from actstore.errors import SpecError

TOML = """
name = "mix"
description = "ablate, steer and keep features"

[[ops]]
kind = "ablate_direction"
hook = "blocks.1.hook_resid_post"
file = "u.npy"

[[ops]]
kind = "steer"
direction = "dir_a"
alpha = 4
positions = "completion"

[[ops]]
kind = "keep_features"
sae_path = "saes/l1"
features = [1, 2, 3]
"""


def test_toml_loads_with_paths_relative_to_the_file(tmp_path):
    (tmp_path / "edit.toml").write_text(TOML)
    spec = EditSpec.from_toml(tmp_path / "edit.toml")
    assert spec.name == "mix" and len(spec.ops) == 3
    assert spec.ops[0].file == str(tmp_path / "u.npy")
    assert spec.ops[1].alpha == 4.0 and spec.ops[1].positions == "completion"
    assert spec.ops[1].hook is None  # taken from the direction when applied
    assert spec.ops[2].sae_path == str(tmp_path / "saes/l1") and spec.ops[2].features == (1, 2, 3)
    assert EditSpec.from_dict(spec.to_dict()) == spec
    (tmp_path / "again.toml").write_text(spec.to_toml())
    assert EditSpec.from_toml(tmp_path / "again.toml") == spec
    assert spec.hash() == EditSpec.from_dict(spec.to_dict()).hash()
    assert spec.hash() != EditSpec(name="mix").hash()


def test_python_api_takes_lists():
    op = EditOp(kind="ablate_subspace", hook="h", directions=["a", "b"])
    spec = EditSpec(name="s", ops=[op])
    assert spec.ops == (op,) and op.directions == ("a", "b")
    assert EditSpec(name="noop").ops == ()
    assert EditOp(kind="project_subspace", directions="a").directions == ("a",)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"name": "e", "opz": []}, "edit: unknown key 'opz'; valid keys: name, ops, description"),
        ({"name": "a/b"}, r"edit name 'a/b' must be letters, digits"),
        ({"name": "e", "ops": {"kind": "steer"}}, "edit .e.: ops must be a list of ops"),
        (
            {"name": "e", "ops": [{"kind": "ablate"}]},
            "op kind 'ablate' is not one of ablate_direction, steer, ablate_subspace",
        ),
        (
            {"name": "e", "ops": [{"kind": "steer", "hook": "h", "direction": "d", "alpha2": 1}]},
            r"edit 'e' ops\[0\]: unknown key 'alpha2'; valid keys: kind, hook, positions, direction",
        ),
        (
            {"name": "e", "ops": [{"kind": "steer", "hook": "h", "direction": "d", "file": "f"}]},
            r"edit 'e' ops\[0\] \(steer\): give exactly one of direction or file, not both",
        ),
        (
            {"name": "e", "ops": [{"kind": "ablate_direction", "hook": "h"}]},
            "give exactly one of direction or file, not neither",
        ),
        (
            {"name": "e", "ops": [{"kind": "steer", "file": "v.npy"}]},
            r"steer needs `hook` \(or name a direction\)",
        ),
        (
            {"name": "e", "ops": [{"kind": "patch", "source_run": "r"}]},
            "patch needs `hook`$",
        ),
        (
            {"name": "e", "ops": [{"kind": "patch", "hook": "h"}]},
            "patch needs `source_run`",
        ),
        (
            {"name": "e", "ops": [{"kind": "ablate_features", "sae": "s"}]},
            "ablate_features needs `features`",
        ),
        (
            {"name": "e", "ops": [{"kind": "clamp_features", "sae": "s", "features": [1]}]},
            "clamp_features needs `value`",
        ),
        (
            {"name": "e", "ops": [{"kind": "ablate_features", "sae": "s", "features": [1, -2]}]},
            r"features must be non-negative feature indices, got \[1, -2\]",
        ),
        (
            {"name": "e", "ops": [{"kind": "keep_features", "sae": "s", "features": [3, 3]}]},
            r"features \[3\] are listed more than once",
        ),
        (
            {
                "name": "e",
                "ops": [{"kind": "steer", "hook": "h", "file": "f", "alpha": float("nan")}],
            },
            "alpha must be a finite number, got nan",
        ),
        (
            {
                "name": "e",
                "ops": [{"kind": "steer", "hook": "h", "file": "f", "positions": "first"}],
            },
            "positions 'first' is not one of all, prompt, completion, last, after:TEXT, span:TEXT, offset:-N",
        ),
        (
            {"name": "e", "ops": [{"kind": "steer", "hook": "h", "file": "f", "alpha": "big"}]},
            r"edit 'e' ops\[0\].alpha: expected float, got 'big'",
        ),
        (
            {"name": "e", "ops": [{"kind": "steer", "hook": "", "file": "f"}]},
            "hook must be a hook name",
        ),
        (
            {"name": "e", "ops": [{"kind": "ablate_direction", "direction": "d", "value": 1.0}]},
            "`value` does not apply to ablate_direction; it takes kind, hook, positions, direction, file$",
        ),
    ],
)
def test_spec_errors(data, match):
    with pytest.raises(SpecError, match=match):
        EditSpec.from_dict(data)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        EditSpec.from_toml(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("name = ")
    with pytest.raises(SpecError, match="invalid TOML"):
        EditSpec.from_toml(tmp_path / "bad.toml")
