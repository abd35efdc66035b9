"""Prose cleaning on the shared mirror's real books, against truth written by hand.

Each passage below was written out by reading the book's text: every prose paragraph on one
line (its hard wraps joined), and verse, tables of contents, tables, lists, indented
letters and headings line for line as the book has them; no `_` emphasis marks, no
[Illustration] tags or footnotes. The test finds each passage, whole paragraphs, in what
`clean_book` makes of the real file, from the start of a paragraph to the end of a line.
"""

from __future__ import annotations

import re

import pytest

from gptrain.data.clean import MARKERS_ONLY, CleanOptions, clean_book, collapse_blank_lines
from gptrain.data.prose import remove_artifacts, unwrap_paragraphs
from gptrain.tokenizer import get_tokenizer

ALICE_OPENING = """\
Contents

 CHAPTER I.     Down the Rabbit-Hole
 CHAPTER II.    The Pool of Tears
 CHAPTER III.   A Caucus-Race and a Long Tale
 CHAPTER IV.    The Rabbit Sends in a Little Bill
 CHAPTER V.     Advice from a Caterpillar
 CHAPTER VI.    Pig and Pepper
 CHAPTER VII.   A Mad Tea-Party
 CHAPTER VIII.  The Queen’s Croquet-Ground
 CHAPTER IX.    The Mock Turtle’s Story
 CHAPTER X.     The Lobster Quadrille
 CHAPTER XI.    Who Stole the Tarts?
 CHAPTER XII.   Alice’s Evidence

CHAPTER I.
Down the Rabbit-Hole

Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: \
once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations \
in it, “and what is the use of a book,” thought Alice “without pictures or conversations?”

So she was considering in her own mind (as well as she could, for the hot day made her feel very sleepy \
and stupid), whether the pleasure of making a daisy-chain would be worth the trouble of getting up and \
picking the daisies, when suddenly a White Rabbit with pink eyes ran close by her."""

ALICE_FATHER_WILLIAM = """\
“Well, I’ve tried to say “How doth the little busy bee,” but it all came different!” Alice replied in a \
very melancholy voice.

“Repeat, “You are old, Father William,’” said the Caterpillar.

Alice folded her hands, and began:—

“You are old, Father William,” the young man said,
    “And your hair has become very white;
And yet you incessantly stand on your head—
    Do you think, at your age, it is right?”

“In my youth,” Father William replied to his son,
    “I feared it might injure the brain;
But, now that I’m perfectly sure I have none,
    Why, I do it again and again.”"""

HOLMES_LETTER = """\
    “MY DEAR MR. SHERLOCK HOLMES,—You really did it very well. You took
    me in completely. Until after the alarm of fire, I had not a
    suspicion. But then, when I found how I had betrayed myself, I
    began to think. I had been warned against you months ago. I had
    been told that, if the King employed an agent, it would certainly
    be you. And your address had been given me. Yet, with all this, you
    made me reveal what you wanted to know. Even after I became
    suspicious, I found it hard to think evil of such a dear, kind old
    clergyman. But, you know, I have been trained as an actress myself.
    Male costume is nothing new to me. I often take advantage of the
    freedom which it gives. I sent John, the coachman, to watch you,
    ran upstairs, got into my walking clothes, as I call them, and came
    down just as you departed.

    “Well, I followed you to your door, and so made sure that I was
    really an object of interest to the celebrated Mr. Sherlock Holmes.
    Then I, rather imprudently, wished you good-night, and started for
    the Temple to see my husband."""
# The end of the narrator's paragraph before the letter, joined into one line.
HOLMES_BEFORE_LETTER = (
    "the letter was superscribed to “Sherlock Holmes, Esq. To be left till called for.” My friend tore it open, "
    "and we all three read it together. It was dated at midnight of the preceding night and ran in this way:\n\n"
    "    “MY DEAR MR. SHERLOCK HOLMES,"
)

CAROL_PREFACE = """\
PREFACE

I HAVE endeavoured in this Ghostly little book, to raise the Ghost of an Idea, which shall not put my \
readers out of humour with themselves, with each other, with the season, or with me.  May it haunt their \
houses pleasantly, and no one wish to lay it.

Their faithful Friend and Servant,
                                   C. D.
December, 1843.

CONTENTS

Stave   I: Marley's Ghost
Stave  II: The First of the Three Spirits
Stave III: The Second of the Three Spirits
Stave  IV: The Last of the Spirits
Stave   V: The End of It

STAVE I:  MARLEY'S GHOST

MARLEY was dead: to begin with. There is no doubt whatever about that. The register of his burial was \
signed by the clergyman, the clerk, the undertaker, and the chief mourner. Scrooge signed it: and \
Scrooge's name was good upon 'Change, for anything he chose to put his hand to. Old Marley was as dead \
as a door-nail."""

MORNING_BELLS_HYMN = """\
    "If washed in Jesus' blood,
      Then bear His likeness too!
    And as you onward press,
      Ask, 'What would Jesus do?'

    "Give with a full, free hand;
      God freely gives to you!
    And check each selfish thought
      With, 'What would Jesus do?'"

3. Third Day.

Upholding.

   "Hold Thou me up, and I shall be safe."--Ps. cxix. 117.

The path is not easy. There are rough stones over which we may stumble, if we are not walking very \
carefully. There are places which look quite smooth, but they are more dangerous than the rough ones, \
for they are slippery. There are little holes hidden under flowers, which may catch our feet and give us \
a bad fall. There are muddy ditches, into which we may slip and get sadly wet and dirty."""

TWO_CITIES = """\
Jerry started in his saddle. “That’s a Blazing strange answer, too,” said he, at his hoarsest.

“Take that message back, and they will know that I received this, as well as if I wrote. Make the best \
of your way. Good night.”"""

ART_OF_WAR = """\
3. The art of war, then, is governed by five constant factors, to be taken into account in one’s \
deliberations, when seeking to determine the conditions obtaining in the field.

4. These are: (1) The Moral Law; (2) Heaven; (3) Earth; (4) The Commander; (5) Method and discipline.

[It appears from what follows that Sun Tzŭ means by "Moral Law" a principle of harmony, not unlike the \
Tao of Lao Tzŭ in its moral aspect. One might be tempted to render it by "morale," were it not considered \
as an attribute of the ruler in § 13.]

5, 6. The Moral Law causes the people to be in complete accord with their ruler, so that they will \
follow him regardless of their lives, undismayed by any danger."""

TIME_MACHINE_FOOTNOTE = (
    "noticed that the floor of the gallery sloped at all. The end I had come in at was quite above ground, "
    "and was lit by rare slit-like windows."
)

MAYFLOWER = """\
In Witness whereof we have hereunto subscribed our names at Cape Cod the eleventh of November, in the \
Raigne of our Sovereigne Lord, King James of England, France, and Ireland, the eighteenth, and of \
Scotland, the fiftie-fourth, Anno. Domini, 1620.

Mr. John Carver           Mr. Stephen Hopkins
Mr. William Bradford      Digery Priest
Mr. Edward Winslow        Thomas Williams"""

THREE_BLIND_MICE = """\
  COMPLETE VERSION
  of ye
  THREE BLIND MICE
  by
  JOHN W. IVIMEY

  Illustrated By
  WALTON CORBOULD"""

SABOTAGE_LIST = """\
(1) Personal Motives

(a) The ordinary citizen very probably has no immediate personal motive for committing simple sabotage. \
Instead, he must be made to anticipate indirect personal gain, such as might come with enemy evacuation \
or destruction of the ruling government group. Gains should be stated as specifically as possible for the \
area addressed: simple sabotage will hasten the day when Commissioner X and his deputies Y and Z will be \
thrown out, when particularly obnoxious decrees and restrictions will be abolished, when food will arrive, \
and so on. Abstract verbalizations about personal liberty, freedom of the press, and so on, will not be \
convincing in most parts of the world. In many areas they will not even be comprehensible."""

TRUTH = [
    (11, "Alice: table of contents, heading, prose", ALICE_OPENING),
    (11, "Alice: prose, then a poem with indented lines", ALICE_FATHER_WILLIAM),
    (1661, "Holmes: an indented letter", HOLMES_LETTER),
    (46, "Christmas Carol: ragged print lines, signature, contents", CAROL_PREFACE),
    (11563, "Morning Bells: a hymn, headings, a quotation, prose", MORNING_BELLS_HYMN),
    (98, "Two Cities: PG's wrap put a space after a closing quote", TWO_CITIES),
    (132, "Art of War: numbered verses, bracketed commentary", ART_OF_WAR),
    (7, "Mayflower Compact: prose and a two-column table", MAYFLOWER),
    (26060, "Three Blind Mice: indented title page, illustrations gone", THREE_BLIND_MICE),
    (26184, "Simple Sabotage: a lettered list", SABOTAGE_LIST),
]


def book(mirror_dir, book_id: int) -> bytes:
    return (mirror_dir / "cache" / "epub" / str(book_id) / f"pg{book_id}.txt").read_bytes()


@pytest.mark.parametrize("book_id,what,truth", TRUTH, ids=[t[1].split(":")[0] + f"-{i}" for i, t in enumerate(TRUTH)])
def test_real_passages_match_hand_written_truth(mirror_dir, book_id, what, truth):
    text = clean_book(book(mirror_dir, book_id))
    # From a paragraph's start to a line's end: a joined paragraph is one line, so it is whole.
    assert "\n\n" + truth + "\n" in "\n\n" + text + "\n", what


def test_joined_paragraph_ends_where_the_letter_starts(mirror_dir):
    holmes = clean_book(book(mirror_dir, 1661))
    assert HOLMES_BEFORE_LETTER in holmes
    assert "\n\n" + HOLMES_BEFORE_LETTER.split("\n\n")[0].split("“Sherlock")[0] not in holmes  # not a paragraph start


def test_footnotes_and_illustrations_go_unless_kept(mirror_dir):
    time_machine = clean_book(book(mirror_dir, 35))
    assert TIME_MACHINE_FOOTNOTE in time_machine and "[Footnote" not in time_machine
    kept = clean_book(book(mirror_dir, 35), CleanOptions(footnotes="keep"))
    assert "sloped at all. [Footnote: It may be, of course, that the floor did not slope" in kept
    monte_cristo = clean_book(book(mirror_dir, 1184))
    assert "FOOTNOTES:" not in monte_cristo and "[30] The miser" not in monte_cristo
    assert monte_cristo.endswith("“‘Wait and hope (Fac et spera)!’”")
    mice = clean_book(book(mirror_dir, 26060))
    assert "[Illustration" not in mice and "  These three Small Mice" in mice
    raw = clean_book(book(mirror_dir, 26060), CleanOptions(artifacts=False))
    assert raw.count("[Illustration") == 31


@pytest.mark.parametrize("book_id", [11, 43, 98, 1661, 2701])
def test_every_wrapped_prose_paragraph_becomes_one_line(mirror_dir, book_id):
    """A sample of books: a flush-left paragraph of 3+ lines whose lines all reach the book's
    margin (within 12 columns of its longest line) and that breaks before a lower-case word
    is prose: it must come out as one line. A block indented throughout comes out as it was."""
    before = collapse_blank_lines(remove_artifacts(clean_book(book(mirror_dir, book_id), MARKERS_ONLY))).strip()
    after = unwrap_paragraphs(before)
    wrapped = indented = 0
    margin = max(len(line) for line in before.split("\n"))
    for block, out in zip(before.split("\n\n"), after.split("\n\n"), strict=True):
        lines = block.split("\n")
        if len(lines) >= 3 and not block[0].isspace() and "\n " not in block \
                and all(len(line) > margin - 12 for line in lines[:-1]) and re.search(r"\n[a-z]", block):
            wrapped += 1
            assert "\n" not in out, block
        if all(line.startswith("  ") for line in lines):
            indented += 1
            assert out == block
    assert wrapped > 100


def test_newline_token_share_falls(mirror_dir):
    """The shared mirror's English books: about one token in thirteen is a newline before
    unwrapping, about one in thirty after (paragraph breaks, verse, tables)."""
    tokenizer = get_tokenizer("gpt2")
    newline_ids = {i for i in range(tokenizer.n_vocab) if "\n" in tokenizer.decode([i])}
    english = [3, 7, 11, 35, 41, 43, 46, 74, 98, 132, 219, 1080, 1184, 1661, 2600, 2701, 9198, 11563, 26060, 26184]
    shares = {}
    for name, options in [("before", MARKERS_ONLY), ("after", CleanOptions())]:
        tokens = [t for b in english for t in tokenizer.encode_ordinary(clean_book(book(mirror_dir, b), options))]
        shares[name] = sum(t in newline_ids for t in tokens) / len(tokens)
    print(f"newline-token share: {shares['before']:.4f} before unwrapping, {shares['after']:.4f} after")
    assert shares["before"] > 0.07 and shares["after"] < 0.035
