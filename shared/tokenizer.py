"""The domain tokenizer: one token per catalogue item, category, price band, rating band, price level and
churn feature band, built locally.

Built with `tokenizers` (a word-level model over whitespace-separated tokens) and wrapped as a
`PreTrainedTokenizerFast`, so it saves and loads with the base directory like any Hugging Face tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, models, pre_tokenizers, processors

if TYPE_CHECKING:  # transformers is imported where a tokenizer is built: the data tools only need the token names
    from transformers import PreTrainedTokenizerFast

from shared.tasks import TASK_TOKENS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def build_tokenizer(item_tokens: Iterable[str], category_tokens: Iterable[str],
                    attribute_tokens: Iterable[str]) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (PAD, EOS, UNK, *TASK_TOKENS, *category_tokens, *attribute_tokens, *item_tokens):
        if token not in vocab:
            vocab[token] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   model_max_length=1024)
