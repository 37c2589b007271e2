"""The locally trained WordPiece tokenizer: the same vocabulary in every process, the trainer's algorithm checked by
hand and against a naive second implementation, and the encoding it gives, saved and reloaded."""

import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tokenizer import SPECIAL, learn_vocab, load_tokenizer, train_wordpiece

REPO = Path(__file__).resolve().parents[1]
SHAPES = ["a red circle on a grey background", "a big red circle and a small blue square",
          "a blue square in the top left, two red circles", "a small green triangle on a white background"] * 5


def test_two_processes_learn_the_same_vocabulary(tmp_path):
    # many words of equal frequency: every merge step has ties, which tokenizers' own trainer broke in hash order
    rng = random.Random(0)
    captions = [" ".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 7))) for _ in range(8))
                for _ in range(200)]
    (tmp_path / "captions.txt").write_text("\n".join(captions))
    script = ("import sys; from pathlib import Path; from tokenizer import train_wordpiece; "
              "train_wordpiece(Path(sys.argv[1]).read_text().split('\\n'), 300, sys.argv[2])")
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "captions.txt"), str(tmp_path / seed)],
                             cwd=REPO, env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    assert [r.wait(timeout=120) for r in runs] == [0, 0]
    first, second = ((tmp_path / seed / "tokenizer.json").read_bytes() for seed in ("1", "2"))
    assert first == second


def test_vocabulary_of_a_corpus_worked_by_hand():
    captions = ["low low low lower", "newest newest widest"]
    # low: l ##o ##w (x3), lower: l ##o ##w ##e ##r, newest: n ##e ##w ##e ##s ##t (x2), widest: w ##i ##d ##e ##s ##t
    alphabet = ["d", "e", "i", "l", "n", "o", "r", "s", "t", "w",  # every character, plain
                "##d", "##e", "##i", "##o", "##r", "##s", "##t", "##w"]  # those that follow another
    merges = [
        "##ow",  # (##o, ##w) and (l, ##o) both 4: the tie goes to the pair that sorts first, "##o" < "l"
        "low",  # (l, ##ow) 4
        "##es",  # (##e, ##s) and (##s, ##t) both 3
        "##est",  # (##es, ##t) 3
        "##ew",  # (##e, ##w), (##w, ##est), (n, ##e) all 2
        "##ewest",  # (##ew, ##est), (n, ##ew) both 2
        "newest",  # (n, ##ewest) 2
        "##dest", "##er", "##idest", "lower", "widest",  # the count-1 pairs, in the order they sort at each step
    ]
    tok = train_wordpiece(captions, 1000)
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == SPECIAL + alphabet + merges  # stops: no pair left
    cut = train_wordpiece(captions, len(SPECIAL) + len(alphabet) + 3)
    assert cut.convert_ids_to_tokens(list(range(len(cut)))) == SPECIAL + alphabet + merges[:3]


def naive_vocab(word_counts: dict[str, int], vocab_size: int) -> list[str]:
    """Sennrich-style BPE: words as space-separated symbols, a full recount and a regex merge per step."""
    words = {w: " ".join([w[0], *("##" + c for c in w[1:])]) for w in word_counts}
    vocab = SPECIAL + sorted(set("".join(words))) + sorted({t for s in words.values() for t in s.split()[1:]})
    while len(vocab) < vocab_size:
        pairs = Counter()
        for w, s in words.items():
            symbols = s.split()
            for p in zip(symbols, symbols[1:]):
                pairs[p] += word_counts[w]
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        if a + b[2:] not in vocab:
            vocab.append(a + b[2:])
        pattern = re.compile(r"(?<!\S)" + re.escape(f"{a} {b}") + r"(?!\S)")
        words = {w: pattern.sub(a + b[2:], s) for w, s in words.items()}
    return vocab


@pytest.mark.parametrize("vocab_size", [40, 10_000])
def test_incremental_counts_match_a_full_recount_per_merge(vocab_size):
    # two letters, many repeats: overlapping pairs (##a ##a ##a), repeated pairs in a word, ties at every step
    rng = random.Random(1)
    word_counts = Counter("".join(rng.choice("ab") for _ in range(rng.randint(1, 9))) for _ in range(300))
    word_counts.update("".join(rng.choice("abcdefg") for _ in range(rng.randint(1, 6))) for _ in range(300))
    assert learn_vocab(dict(word_counts), vocab_size) == naive_vocab(word_counts, vocab_size)


def test_encoding_frequent_words_unseen_words_framing_and_size():
    tok = train_wordpiece(SHAPES, 60)
    assert len(tok) == 60  # enough pairs left to fill it, and never more
    assert tok.convert_tokens_to_ids(SPECIAL) == [0, 1, 2, 3, 4]
    full = train_wordpiece(SHAPES, 8000)
    assert len(full) < 8000  # ran out of pairs: every word is then one token
    assert full.tokenize("A Red circle, on GREY") == ["a", "red", "circle", ",", "on", "grey"]
    assert full.tokenize("circled") == ["circle", "##d"]  # an unseen word from known pieces
    assert full.tokenize("red!") == ["red", "[UNK]"]  # a character never seen ("!", split off as punctuation)
    assert full.tokenize("bz \u2603") == ["[UNK]", "[UNK]"]  # "z", a snowman never seen: the whole word is [UNK]
    ids = full("a red square")["input_ids"]
    assert full.convert_ids_to_tokens(ids) == ["[CLS]", "a", "red", "square", "[SEP]"]
    with pytest.raises(ValueError, match="too small"):
        train_wordpiece(SHAPES, 10)  # the alphabet alone is larger


def test_saved_tokenizer_reloads_and_encodes_the_same(tmp_path):
    tok = train_wordpiece(SHAPES, 60, tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    texts = ["a red circle on a grey background", "Circled SQUARES, bz \u2603", ""]
    assert again(texts)["input_ids"] == tok(texts)["input_ids"]
    assert again.get_vocab() == tok.get_vocab()
    assert (again.cls_token_id, again.sep_token_id, again.pad_token_id, again.unk_token_id) == (2, 3, 0, 1)


def test_a_vocab_size_of_exactly_the_alphabet_is_enough():
    """The error says "give at least that": the special tokens and characters alone, with no merge, are accepted."""
    captions = ["low low low lower", "newest newest widest"]
    alphabet = len(SPECIAL) + 18  # 10 plain characters and 8 that follow another (worked by hand above)
    tok = train_wordpiece(captions, alphabet)
    assert len(tok) == alphabet and not any(len(t.removeprefix("##")) > 1 for t in tok.get_vocab() if t not in SPECIAL)
    with pytest.raises(ValueError, match=f"alone make {alphabet} tokens; give at least that"):
        train_wordpiece(captions, alphabet - 1)


CAPTIONS_A = ["a red circle on the left", "a blue square on the right"] * 3
CAPTIONS_B = ["an orange hexagon at the top", "a purple star at the bottom"] * 3


def test_a_saved_tokenizer_without_its_record_is_trained_again(tmp_path):
    """tokenizer.json is written before trained_on.json: a run killed in between leaves a folder without the record,
    which must be trained again rather than crash or be trusted."""
    load_tokenizer("local", "distilbert", tmp_path, lambda: CAPTIONS_A, 80)
    (tmp_path / "tokenizer" / "trained_on.json").unlink()
    tok = load_tokenizer("local", "distilbert", tmp_path, lambda: CAPTIONS_A, 80)
    assert tok.get_vocab() == train_wordpiece(CAPTIONS_A, 80).get_vocab()
    assert (tmp_path / "tokenizer" / "trained_on.json").exists()


def test_a_save_that_fails_part_way_never_leaves_an_older_record_vouching_for_the_new_files(tmp_path, monkeypatch):
    """Retraining for other captions whose save fails after tokenizer.json is written: the next run with the first
    captions must get their vocabulary, not the half-saved one's."""
    load_tokenizer("local", "distilbert", tmp_path, lambda: CAPTIONS_A, 80)
    save = PreTrainedTokenizerFast.save_pretrained

    def save_then_fail(self, *args, **kwargs):  # the files are written, then e.g. the disk fills up
        save(self, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", save_then_fail)
    load_tokenizer("local", "distilbert", tmp_path, lambda: CAPTIONS_B, 80)
    monkeypatch.undo()
    again = load_tokenizer("local", "distilbert", tmp_path, lambda: CAPTIONS_A, 80)
    assert again.get_vocab() == train_wordpiece(CAPTIONS_A, 80).get_vocab()


def test_a_tokenizer_folder_without_tokenizer_files_names_the_way_out(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match=r"could not load the tokenizer(.|\n)*--tokenizer local"):
        load_tokenizer(str(tmp_path / "empty"), "distilbert", tmp_path, lambda: [], 100)
