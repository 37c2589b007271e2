"""Tokenizers: the text model's own from the Hub, or a WordPiece one trained offline on a data set's captions.

The local one is saved as DATA/tokenizer (tokenizer.json + config) and loaded through transformers like any other,
so an offline data folder in the Flickr30k format trains with no download at all. A data folder that cannot be
written (read-only, a shared mount) still trains: the tokenizer is then kept in memory, and each checkpoint holds it.
"""

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from utils import hub_error, write_json

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(captions: list[str], vocab_size: int, out_dir=None) -> PreTrainedTokenizerFast:
    """A lower-casing BERT-style WordPiece tokenizer learned from `captions`, saved to out_dir if given."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(captions, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL))
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
        # what it was trained from: a new --vocab-size, or other training captions, train it again
        source = {"vocab_size": vocab_size, "captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest()}
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
    name = name or text_model
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise hub_error(name, "tokenizer", "--tokenizer local (a WordPiece tokenizer trained on your captions) "
                        "with --no-text-pretrained --text-model distilbert", e) from None
