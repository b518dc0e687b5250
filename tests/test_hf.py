"""Hugging Face progress bars stay out of actstore's output."""

from __future__ import annotations

from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from actstore.analysis import lens
from actstore.hf import no_hf_progress


def test_model_loads_draw_no_bars_and_settings_are_restored(llama_dir, capfd):
    hf_logging.enable_progress_bar()
    try:
        # the control: transformers draws its bar when nothing silences it
        AutoModelForCausalLM.from_pretrained(llama_dir)
        assert "Loading weights" in capfd.readouterr().err
        model, path = lens._load_model(llama_dir)  # what `actstore analyze unembed` loads
        lens._load_tokenizer(None, path)
        out = capfd.readouterr()
        assert "Loading weights" not in out.err + out.out
        assert model is not None and hf_logging.is_progress_bar_enabled()
        with no_hf_progress():
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.disable_progress_bar()
