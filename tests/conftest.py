"""Session fixtures shared by the whole test suite.

Tiny models are built once per session (a few seconds in all) under pytest's
temporary directory; see :mod:`tests.helpers.tiny`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
