"""A byte-level BPE tokenizer trained on the benchmark's own text.

A real :mod:`tokenizers` tokenizer, saved in the Hugging Face format, so
``AutoTokenizer.from_pretrained`` loads it like any other. The vocabulary is
small and covers every name part and answer as one token, which keeps the
models and the sequences short.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["BOS", "EOS", "IMAGE", "PAD", "SPECIAL_TOKENS", "train_tokenizer"]

PAD, BOS, EOS, IMAGE = "<pad>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE)  # ids 0..3, in this order


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: the corpus (questions, answers, prompts).
        vocab_size: target vocabulary size, special tokens and the 256 bytes included.

    Returns:
        A fast tokenizer that prepends ``<s>`` (``add_special_tokens=True``),
        with ``</s>`` as EOS, ``<pad>`` as padding and ``<image>`` as a special token.
    """
    tok = Tokenizer(models.BPE())
    # No prefix space: " " + answer must tokenize to the same tokens as the
    # word inside a sentence, which byte-level BPE gives when spaces stay attached.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=512,
    )
