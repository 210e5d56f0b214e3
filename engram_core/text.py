"""Canonical text: the one form of triggers, answers, prompts and ids, at ingest and at serve time.

A fact is recalled when the tokens a user's prompt ends with are the tokens it was compiled
with, so the same visible text must always reach the tokenizer as the same code points. One
rule, applied to the fact log at ingest (:func:`canonical_fact`, :func:`canonical_id`) and to
every prompt at serve time (:func:`canonical_prompt`: ``engram ask``, ``engram serve``,
:func:`engram_core.serving.generate`):

1. **Unicode NFC.** "José" typed as ``e`` + U+0301 (NFD) and as ``é`` (NFC) are one text.
2. **Invisible format characters are removed**: every code point of Unicode category Cf
   (U+200B zero-width space, U+FEFF byte-order mark, U+200E/U+200F direction marks, U+00AD soft
   hyphen, U+2060 word joiner, ...). They change the tokens (and so the rows a trigger
   addresses) but not what a reader sees. Kept in texts (not in ids), because there they do
   change what a reader sees: U+200D zero-width joiner and U+200C zero-width non-joiner between
   two non-ASCII characters (emoji sequences such as the family 👨‍👩‍👧 and the rainbow flag 🏳️‍🌈,
   Persian می‌خواهم, Indic conjuncts), and emoji tag characters (U+E0020-U+E007F) where they spell
   a subdivision flag (U+1F3F4, tags, the cancel tag). Between ASCII characters a joiner is
   pasted noise and is removed; tags anywhere else are invisible text (they can smuggle ASCII).
3. **Spaces**: every Unicode space separator (category Zs: U+00A0 no-break space, U+2009 thin
   space, ...) becomes U+0020, and runs of spaces become one. Tabs and newlines are kept;
   Windows (CR LF) and old Mac (CR) line breaks become a newline, and in texts (not ids) so do
   Unicode's NEL (U+0085), line separator (U+2028) and paragraph separator (U+2029).
4. **Prompts and triggers are stripped** of leading and trailing whitespace: a user types
   "My dentist is Dr." with or without a trailing space.
5. **The boundary space belongs to the answer.** A byte-level BPE tokenizer (GPT-2, Llama 3,
   Qwen2, the tiny model's) keeps a word's leading space in the word's token (" Akeredolu"), so
   the natural prompt "My dentist is Dr." is followed by " Akeredolu", never by "Akeredolu"
   after a trigger that ends in a space token. So the answer is stripped of leading whitespace
   and gets exactly one leading space when the fact log put whitespace at the boundary
   (``"My dentist is Dr. " + "Akeredolu"``, ``"My dentist is Dr." + " Akeredolu"``) or when it
   put none after a word's end (:func:`_word_end`: a letter, digit or combining mark, ``.,:;!?%…``,
   a closing bracket or quote, an emoji or other symbol but a degree sign, a dash or math sign
   standing alone), unless the answer's first
   character belongs to the word before (:func:`_attaches_left`: a closing bracket or quote, a
   contraction, ``.,;:!?`` not opening a word, a unit sign, a hyphen before a letter, ``@`` ending
   an email address). A fact log splits a sentence where the value starts: ``"...city of" +
   "Lisbon"`` is "...city of Lisbon", and ``"$500"``, ``"'98"``, ``"@jane"``, ``"-5"``, ``"- socks"``,
   ``".NET"``, ``"§ 12"``, ``"〒150"``, an emoji open words too; ``"My email is jane" +
   "@example.org"``, ``"25" + "°C"``, ``"Flight AB-" + "1234"`` and ``"costs $" + "12"`` join.
   Never after a character of a script written without spaces between words (Chinese, Japanese,
   Thai, Lao, Khmer, Myanmar, Tibetan) or CJK / full-width punctuation: ``"我住在" + "东京"`` is
   "我住在东京" (Hangul and full-width Latin letters are spaced).
   Measured on the tiny model (tests/test_text.py): the natural prompt recalls the answer with
   this rule and not with the stored split.
6. **Typed punctuation in triggers and prompts**: the typographic quotes ‘ ’ “ ” become ' and ",
   and the ellipsis … becomes "...". Phone and word-processor keyboards ("smart punctuation")
   write them for what a user types as ' " ..., so the same trigger arrives both ways ("My wife’s
   phone number is" logged from a phone, "My wife's phone number is" typed at a desk); their
   tokens differ. Answers keep them as written: they are what is served.
7. **Ids** (user_id, fact_id, scope) follow rules 1-3, with every format character removed
   (joiners too: an id is an identity, not a text to read), and are stripped, so ``u-sam``,
   ``u-sam`` + U+200B and U+FEFF + ``u-sam`` are one user (issue 16 item 5); ``engram forget``
   canonicalises its argument the same way.

Control characters (other than tab and newline) are not removed here: ingest rejects them
(``CONTROL_CHARACTERS``, :mod:`schemas.facts`). All functions are pure, standard library only.
"""

from __future__ import annotations

import re
import unicodedata

_SPACES = re.compile(r" {2,}")
_WHITESPACE = re.compile(r"\s+")
# Trigger endings after which a letter or digit starts a new word when the log put no space.
_WORD_END_PUNCTUATION = frozenset(".,:;!?)]}%\u2026")  # U+2026: the ellipsis "…"
# What an emoji sequence may end in beside the emoji itself (So) and its variation selector (Mn):
# a skin tone (U+1F3FB..U+1F3FF, Sk) and a subdivision flag's cancel tag (U+E007F, Cf).
_EMOJI_TAILS = frozenset([chr(c) for c in range(0x1F3FB, 0x1F400)] + ["\U000E007F"])


def is_format_character(char: str) -> bool:
    """True for an invisible format character (Unicode category Cf: U+200B, U+FEFF, U+00AD, ...)."""
    return unicodedata.category(char) == "Cf"


def has_format_characters(text: str) -> bool:
    return any(unicodedata.category(c) == "Cf" for c in text)


_JOINERS = frozenset("\u200c\u200d")


def _joiner_kept(text: str, i: int) -> bool:
    """Rule 2's exception for the joiner ``text[i]``: the characters around its run of joiners are
    both non-ASCII and not spaces."""
    before, after = i - 1, i + 1
    while before >= 0 and text[before] in _JOINERS:
        before -= 1
    while after < len(text) and text[after] in _JOINERS:
        after += 1
    if before < 0 or after >= len(text):
        return False
    return not (text[before].isascii() or text[after].isascii() or text[before].isspace() or text[after].isspace())


def canonical_text(text: str, *, keep_joiners: bool = True) -> str:
    """Rules 1-3: NFC, format characters removed (``keep_joiners``: but for rule 2's exceptions),
    space separators as one U+0020, CR LF and CR as LF (``keep_joiners``: NEL, U+2028 and U+2029
    too). Not stripped. Idempotent."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if keep_joiners and not text.isascii():  # in texts, Unicode's other line breaks too (ids keep them as written)
        text = text.translate(LINE_BREAKS)
    if text.isascii():  # the common case: no Cf, no Zs other than U+0020, already NFC
        return _SPACES.sub(" ", text) if "  " in text else text
    kept = "".join(" " if unicodedata.category(c) == "Zs" else c for c in text
                   if unicodedata.category(c) != "Cf" or (keep_joiners and (c in _JOINERS or _is_tag(c))))
    kept = unicodedata.normalize("NFC", kept)
    if keep_joiners and any(c in _JOINERS or _is_tag(c) for c in kept):  # judged on the text the other rules left
        flags = _flag_tags(kept)  # stray tags go first: a joiner is judged by the characters that stay
        kept = "".join(c for i, c in enumerate(kept) if not _is_tag(c) or i in flags)
        kept = unicodedata.normalize("NFC", "".join(c for i, c in enumerate(kept)
                                                    if c not in _JOINERS or _joiner_kept(kept, i)))
    return _SPACES.sub(" ", kept)


# NEL (U+0085: EBCDIC's and ISO 6429's, left by conversions), LINE SEPARATOR (U+2028: a soft line
# break in word processors' and JavaScript's text) and PARAGRAPH SEPARATOR (U+2029) as a newline.
LINE_BREAKS = {0x85: "\n", 0x2028: "\n", 0x2029: "\n"}


def _is_tag(char: str) -> bool:
    return 0xE0020 <= ord(char) <= 0xE007F


def _flag_tags(text: str) -> set[int]:
    """Indices of the tag characters that spell a subdivision flag: U+1F3F4, then tags, then the
    cancel tag U+E007F (🏴 + "gbeng" + cancel is England's flag). Tags anywhere else are invisible
    text that changes the tokens (they can smuggle ASCII), and go."""
    kept: set[int] = set()
    i = text.find("\U0001F3F4")
    while i != -1:
        end = i + 1
        while end < len(text) and 0xE0020 <= ord(text[end]) <= 0xE007E:
            end += 1
        if end > i + 1 and end < len(text) and text[end] == "\U000E007F":
            kept.update(range(i + 1, end + 1))
        i = text.find("\U0001F3F4", end)
    return kept


def normalize_token_text(text: str) -> str:
    """The tokenizer compression's text form (METHOD.md; engram_core.addressing builds the canonical
    ids from it): NFKC, strip accents, lowercase, collapse whitespace, strip (whitespace-only -> ' ')."""
    norm = unicodedata.normalize("NFKC", text)
    norm = "".join(c for c in unicodedata.normalize("NFD", norm) if not unicodedata.combining(c))
    norm = _WHITESPACE.sub(" ", norm.lower())
    stripped = norm.strip()
    if stripped:
        return stripped
    return " " if norm else text


def unpaired_surrogate(text: str) -> int | None:
    """The index of the first lone UTF-16 surrogate (U+D800..U+DFFF) in ``text``, else None.

    Such a string is not Unicode text and cannot be encoded as UTF-8: JSON's ``"\\ud800"`` escape
    and bytes that are not UTF-8 in a command line (Python's surrogateescape) make one. Ingest
    never stores one (a row with invalid UTF-8 is rejected), so no stored id or fact holds one."""
    match = _SURROGATE.search(text)
    return match.start() if match else None


_SURROGATE = re.compile("[\ud800-\udfff]")


# Rule 6: what "smart punctuation" writes for ' " and ..., read as typed in triggers and prompts:
# the English forms, the low-9 quotes German, Czech or Polish keyboards open with (‚ „) and the
# reversed ones (‛ ‟).
_TYPED_PUNCTUATION = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                                    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2026": "..."})


def canonical_prompt(text: str) -> str:
    """A prompt as the model sees it at serve time: :func:`canonical_text`, stripped (rule 4), the
    typographic quotes and ellipsis as typed (rule 6). A trigger's canonical form is one too."""
    return _as_typed(canonical_text(text).strip())


def _as_typed(text: str) -> str:
    """Rule 6 on a text already read by rules 1-3."""
    return text if text.isascii() else text.translate(_TYPED_PUNCTUATION)


def canonical_id(value: str) -> str:
    """A user_id, fact_id or scope in its canonical form (rule 7); may return "" (then rejected)."""
    return canonical_text(value, keep_joiners=False).strip()


# Scripts written without spaces between words (Han, kana, bopomofo, Thai, Lao, Khmer, Myanmar,
# Tibetan), CJK punctuation and the full-width punctuation and half-width katakana: after one of
# these, no space is inserted. Hangul (Korean is written with spaces) and full-width Latin letters
# and digits are not among them.
_UNSPACED = ((0x0E00, 0x0EFF), (0x0F00, 0x0FFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x2E80, 0x312F),
             (0x3190, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFE30, 0xFE4F),
             (0xFF01, 0xFF0F), (0xFF1A, 0xFF20), (0xFF3B, 0xFF40), (0xFF5B, 0xFF9F), (0x20000, 0x3FFFF))
# Answer starts that belong to the word before them (see _attaches_left); every other character
# opens a word after a word's end: letters, digits, "$12", '"carpe diem"', "'98", "#12", "¿",
# "- socks", ".NET", "~5 km", "/r/python", "§ 12", "№ 5", "≈ 3", "〒150-0002", an emoji.
_SENTENCE_PUNCTUATION = frozenset(".,;:!?")
# % ‰ ‱ ° ℃ ℉ ′ ″ after their number; ™ ® © ℠ after their name; ^ (an exponent)
_UNIT_SIGNS = frozenset("%\u2030\u2031\u00b0\u2103\u2109\u2032\u2033\u2122\u00ae\u00a9\u2120^")
_QUOTES = frozenset("\"'\u2019")  # U+2019: the apostrophe word processors write
# "My dog" + "'s name" and "They" + "'re here" join: an apostrophe that ends a word, not a quote
# ("'s-Hertogenbosch" is a name that opens a word)
_CONTRACTION = re.compile("['\u2019](s|re|ll|d|ve|m|t)\\b(?!-)", re.IGNORECASE)
_EMAIL_DOMAIN = re.compile(r"@[\w-]+(\.[\w-]+)+\b")
# Last words of a trigger that are never an address's local part: "My Instagram is" + "@jane.doe"
# and "find me on" + "@jane.doe" open a handle, where "My email is jane" + "@example.org" ends an
# address. Function words (English and a few common others) and the names of handles and networks.
_BEFORE_A_HANDLE = frozenset("""
    is are was were am be been being has have had will would at as to on in by via of for from with
    my our your his her their its the and or called named
    handle handles username usernames nickname account profile tag gamertag
    instagram twitter tiktok threads telegram github gitlab mastodon bluesky discord reddit snapchat
    youtube twitch linkedin facebook slack signal skype keybase
    ist es est är er jest è é
""".split())


def _unspaced(char: str) -> bool:
    code = ord(char)
    return code >= 0x0E00 and any(low <= code <= high for low, high in _UNSPACED)


def _word_end(trigger: str) -> bool:
    """Whether the trigger ends where a new word may follow: a letter or digit (a combining mark
    too: Hindi "है" ends in a vowel sign), closing punctuation (``.,:;!?%``, brackets, closing
    quotes), or a dash or math sign standing alone after a space ("Мой врач —", "Total ="). Not
    after a character that attaches to what follows ("costs $", "Flight AB-", "Room #", an
    opening quote) or one of a script written without spaces between words."""
    end = trigger[-1]
    if _unspaced(end):
        return False
    category = unicodedata.category(end)
    if end.isalnum() or category in ("Mn", "Mc", "Me", "Lm", "Pe", "Pf") or end in _WORD_END_PUNCTUATION:
        return True
    if category == "So" and end != "\u00b0" or end in _EMOJI_TAILS:  # an emoji, pictograph or mark such as
        return True  # "™" ends a word ("Favourite drink 🍺" + " IPA"); a degree sign awaits its unit ("25°" + "C")
    alone = len(trigger) >= 2 and trigger[-2].isspace()
    if end in _QUOTES:  # closing after a word ('He says "hi"'), opening after a space ('motto is "')
        return len(trigger) >= 2 and not alone
    return alone and category in ("Pd", "Sm")


def _attaches_left(trigger: str, answer: str) -> bool:
    """Whether the answer's first character belongs to the word before it: closing brackets and
    quotes, ``'s`` and the other contractions, ``.,;:!?`` not opening a word (".NET" and "...and"
    do), a unit or percent sign ("25" + "°C"), a combining mark, a hyphen before a letter ("e" +
    "-mail"), or ``@`` that ends an email address ("jane" + "@example.org")."""
    start, after = answer[0], answer[1:2]
    category = unicodedata.category(start)
    if start in _QUOTES:  # an opening quote before a word or number; a closing one, or "'s"
        return not after.isalnum() or bool(_CONTRACTION.match(answer))
    if category in ("Mn", "Mc", "Me", "Pe", "Pf") or start in _UNIT_SIGNS \
            or unicodedata.decomposition(start).startswith(("<super>", "<sub>")):  # "m" + "²"
        return True
    if start == "." and after.isalnum():  # ".NET" opens a word after "is"; "example" + ".com" ends one
        return _ends_a_name(trigger)
    if start in _SENTENCE_PUNCTUATION:  # ", please" and "?" join; an ellipsis before a word opens it, and
        # so does an answer of punctuation alone, a value of its own (":-)", "...", "???")
        if len(answer) >= 2 and not any(c.isalnum() for c in answer):
            return False
        return not (answer.startswith("...") and answer.lstrip(".")[:1].isalnum()) and not after.isalnum()
    if category == "Pd":  # "- socks" (a bullet), "-5" and "– lead" open a word; "-mail" continues one
        return after.isalpha()
    if start == "@":  # "My email is jane" + "@example.org" ends an address, unless the word before is
        # one no address starts with ("My Instagram is" + "@jane.doe"); "@jane" alone is a handle
        return bool(_EMAIL_DOMAIN.match(answer)) and _ends_a_name(trigger)
    return False


def _ends_a_name(trigger: str) -> bool:
    """Whether the trigger's last word can be the start of an address or a file name ("jane" +
    "@example.org", "example" + ".com"): it ends in a letter or digit and is not a function word or
    a handle's or network's name."""
    return trigger[-1].isalnum() and trigger.rsplit(None, 1)[-1].lower() not in _BEFORE_A_HANDLE


def _space_between(trigger: str, answer: str) -> bool:
    """Rule 5 when the log put no whitespace at the boundary: a fact log splits a sentence where
    the value starts, so the answer opens a new word after a word's end, unless its first
    character belongs to the word before, or the split falls inside a number ("+1 (555) 01" +
    "23-4567", "My balance is 1." + "234,56 €": a digit, or a digit and ``.`` or ``,``, then a
    digit)."""
    if answer[0].isdecimal() and (trigger[-1].isdecimal()
                                  or trigger[-1] in ".," and len(trigger) >= 2 and trigger[-2].isdecimal()):
        return False
    return _word_end(trigger) and not _attaches_left(trigger, answer)


def canonical_fact(trigger: str, answer: str) -> tuple[str, str]:
    """(trigger, answer) in canonical form (rules 1-6). ``trigger`` is what a user types
    (:func:`canonical_prompt` of it is itself); ``answer`` carries the boundary space. Empty
    texts stay empty (ingest rejects them)."""
    if (answer[:1] == " " and trigger.isascii() and answer.isascii() and "  " not in trigger and "  " not in answer
            and trigger[:1] > " " and trigger[-1:] > " " and answer[1:2] > " " and answer[-1:] > " "
            and "\r" not in trigger and "\r" not in answer):
        return trigger, answer  # already canonical (most facts): no copy
    trigger, answer = canonical_text(trigger), canonical_text(answer)
    spaced = trigger[-1:].isspace() or answer[:1].isspace()
    trigger, answer = _as_typed(trigger.strip()), answer.strip()
    if trigger and answer and (spaced or _space_between(trigger, answer)):
        answer = " " + answer
    return trigger, answer
