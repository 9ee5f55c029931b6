"""The domain tokenizer: one token per catalogue item, category, price band, rating band, price level and
churn feature band and number, built locally.

Built with `tokenizers` (a word-level model over whitespace-separated tokens) and wrapped as a
`PreTrainedTokenizerFast`, so it saves and loads with the base directory like any Hugging Face tokenizer. A base
pretrained from a user's T5 checkpoint (config key `base-model`) keeps that checkpoint's tokenizer instead and gains
the same domain tokens as whole-word added tokens (`add_domain_tokens`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

if TYPE_CHECKING:  # transformers is imported where a tokenizer is built: the data tools only need the token names
    from transformers import PreTrainedTokenizerFast

from shared.errors import UserError
from shared.files import reading
from shared.tasks import TASK_TOKENS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def domain_tokens(item_tokens: Iterable[str], category_tokens: Iterable[str],
                  attribute_tokens: Iterable[str]) -> list[str]:
    """fedshop's words in vocabulary order, once each: task tokens, categories, attributes (bands, price levels,
    churn features, semantic codes), items."""
    return list(dict.fromkeys((*TASK_TOKENS, *category_tokens, *attribute_tokens, *item_tokens)))


def build_tokenizer(item_tokens: Iterable[str], category_tokens: Iterable[str],
                    attribute_tokens: Iterable[str]) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    words = (PAD, EOS, UNK, *domain_tokens(item_tokens, category_tokens, attribute_tokens))
    vocab = {token: index for index, token in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   model_max_length=1024)


def load_checkpoint_tokenizer(directory: Path, where: str) -> PreTrainedTokenizerFast:
    """The fast tokenizer of a Hugging Face checkpoint directory (`tokenizer.json`), read locally only, with its pad
    and end-of-sequence tokens (T5's `<pad>` and `</s>` when its files do not name them); a UserError naming the
    file and `where` (the config key) otherwise."""
    from transformers import PreTrainedTokenizerFast

    try:
        with reading(directory / "tokenizer.json", "a Hugging Face fast tokenizer (tokenizer.json)"):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    vocab = tokenizer.get_vocab()
    for role, default in (("pad", PAD), ("eos", EOS)):
        if getattr(tokenizer, f"{role}_token") is None:
            if default not in vocab:
                raise UserError(f"{where}: the tokenizer in {directory} has no {role} token and no {default!r} in its "
                                f"vocabulary; expected a T5 tokenizer (pad {PAD}, end of sequence {EOS})")
            setattr(tokenizer, f"{role}_token", default)
    return tokenizer


def add_domain_tokens(tokenizer: PreTrainedTokenizerFast, tokens: list[str]) -> list[int]:
    """Give a checkpoint's tokenizer fedshop's `tokens` as whole words; returns the ids it did not have before.

    Each is an added token matched on the raw text as a single word, absorbing the spaces around it, so a source
    of whitespace-separated domain tokens encodes to one id per word and no "▁" pieces. The tokenizer then ends
    every input with its end-of-sequence token, as T5 was trained and as fedshop's own tokenizer does. A token the
    checkpoint's vocabulary already holds keeps its id (and its trained embedding row)."""
    before = len(tokenizer)
    tokenizer.add_tokens([AddedToken(token, single_word=True, lstrip=True, rstrip=True, normalized=False)
                          for token in tokens])
    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, tokenizer.eos_token_id)])
    return sorted({i for i in tokenizer.convert_tokens_to_ids(tokens) if i >= before})


def check_whole_words(tokenizer: PreTrainedTokenizerFast, sources: list[str], where: str) -> None:
    """UserError unless every source encodes to exactly one id per whitespace-separated word, then end of sequence."""
    eos = tokenizer.eos_token_id
    for source, ids in zip(sources, tokenizer(sources)["input_ids"], strict=True):
        words = source.split()
        if len(ids) != len(words) + 1 or ids[-1] != eos:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise UserError(f"{where}: its tokenizer, with fedshop's domain tokens added, splits {source!r} into "
                            f"{pieces} instead of one token per word and {tokenizer.eos_token}; a tokenizer whose "
                            "normalizer or post-processor rewrites whole words cannot serve as a fedshop base")
