"""Tokenizers: the text model's own from the Hub, or a WordPiece one trained offline on a data set's captions.

The local vocabulary is learnt here rather than by `tokenizers`' WordPieceTrainer, which breaks ties between equally
frequent pairs in hash-map order (huggingface/tokenizers#1794): the same captions gave a different vocabulary, and
so a different model, in every process. Ours is the same algorithm with ties broken by the tokens' text.

The local one is saved as DATA/tokenizer (tokenizer.json + config) and loaded through transformers like any other,
so an offline data folder in the Flickr30k format trains with no download at all. A data folder that cannot be
written (read-only, a shared mount) still trains: the tokenizer is then kept in memory, and each checkpoint holds it.
"""

import hashlib
import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CONFIG_MAPPING, AutoTokenizer, PreTrainedTokenizerFast

from utils import hub_error, model_type_of, write_json

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Part of what a saved DATA/tokenizer was trained from: bump it when the same captions would give another vocabulary,
# so that folders trained before are trained again (2: our deterministic trainer replaced tokenizers' own).
TRAINER_VERSION = 2


def learn_vocab(word_counts: dict[str, int], vocab_size: int) -> list[str]:
    """The vocabulary, in id order, that tokenizers' WordPieceTrainer learns from `word_counts` with its defaults
    (min_frequency=0, no limit_alphabet): SPECIAL, every character seen (plain, then as `##c` where it follows
    another), then BPE merges of the most frequent adjacent pair (counted once per occurrence, weighted by the word's
    count) until vocab_size is reached or no pair is left. Ties go to the pair (a, b) that sorts first."""
    words = [[w[0], *("##" + c for c in w[1:])] for w in word_counts]
    counts = list(word_counts.values())
    vocab = SPECIAL + sorted({c for w in word_counts for c in w}) + sorted({t for w in words for t in w[1:]})
    if len(vocab) > vocab_size:
        raise ValueError(f"--vocab-size {vocab_size} is too small: the {len(SPECIAL)} special tokens and the "
                         f"characters of the training captions alone make {len(vocab)} tokens; give at least that")
    known = set(vocab)

    pair_count, where = Counter(), defaultdict(set)  # where: the words that hold (or held) the pair
    for i, (w, n) in enumerate(zip(words, counts)):
        for pair in zip(w, w[1:]):
            pair_count[pair] += n
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pair_count.items()]  # most frequent first, then the pair's strings
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        n, pair = heapq.heappop(heap)
        if -n != pair_count.get(pair):
            continue  # stale: the pair's count changed after this entry was pushed, and a newer entry holds it
        a, b = pair
        merged = a + b[2:]  # b always follows another token, so it is "##..."
        if merged not in known:  # a guard tokenizers' trainer has too; BPE should not spell a token twice
            vocab.append(merged)
            known.add(merged)
        # only the words that hold the pair change; their pairs' counts move by the difference
        delta = Counter()
        for i in where.pop(pair):
            old, new = words[i], merge(words[i], a, b, merged)
            words[i] = new
            for p in zip(old, old[1:]):
                delta[p] -= counts[i]
            for p in zip(new, new[1:]):
                delta[p] += counts[i]
                where[p].add(i)
        for p, d in delta.items():
            if d:
                pair_count[p] += d
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
                else:
                    del pair_count[p]
    return vocab


def merge(word: list[str], a: str, b: str, merged: str) -> list[str]:
    """`word` with each adjacent a, b, left to right, replaced by `merged`."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_wordpiece(captions: list[str], vocab_size: int, out_dir=None) -> PreTrainedTokenizerFast:
    """A lower-casing BERT-style WordPiece tokenizer learned from `captions`, saved to out_dir if given. The same
    captions and vocab_size give the same vocabulary in every process."""
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    # the words exactly as the tokenizer will split them when it encodes
    words = Counter(w for c in captions for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(c)))
    vocab = learn_vocab(words, vocab_size)
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(name: str, text_model: str, data_dir, train_captions, vocab_size: int):
    """`name`: "" = the text model's own tokenizer; "local" = DATA/tokenizer, trained on train_captions() if absent;
    anything else = a Hub name or a folder."""
    if name == "local":
        path = Path(data_dir) / "tokenizer"
        captions = train_captions()
        # what it was trained from: a new --vocab-size, trainer or other training captions, train it again
        source = {"vocab_size": vocab_size, "trainer": TRAINER_VERSION,
                  "captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest()}
        record = path / "trained_on.json"
        if not (path / "tokenizer.json").exists() or not record.exists() or json.loads(record.read_text()) != source:
            print(f"training a WordPiece tokenizer of at most {vocab_size} tokens on the {len(captions)} training "
                  f"captions -> {path}")
            tokenizer = train_wordpiece(captions, vocab_size)
            try:
                record.unlink(missing_ok=True)  # until the new one is saved whole, the folder holds no valid one
                tokenizer.save_pretrained(path)
                write_json(record, source)  # last: a tokenizer saved only in part is trained again next time
            except OSError as e:
                print(f"note: could not save the tokenizer to {path} ({e.strerror or e}); training goes on with it "
                      f"from memory (checkpoints hold their own copy), but it is trained again every run until "
                      f"{path.parent} is writable")
                return tokenizer
        return AutoTokenizer.from_pretrained(path)
    given = "--tokenizer" if name else "--text-model"
    name = name or text_model
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        if name in CONFIG_MAPPING and not Path(name).exists():  # "distilbert": an architecture, no vocabulary
            raise ValueError(f"{given} {name} is a model type, which comes with no tokenizer: name one with "
                             f"--tokenizer (a Hub model such as distilbert-base-uncased, or a folder), or train one "
                             f"on your captions with --tokenizer local") from None
        raise hub_error(name, "tokenizer", f"--tokenizer local (a WordPiece tokenizer trained on your captions) with "
                        f"--no-text-pretrained --text-model {model_type_of(name)}", e,
                        local_flag="--tokenizer") from None
