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
   Windows (CR LF) and old Mac (CR) line breaks become a newline.
4. **Prompts and triggers are stripped** of leading and trailing whitespace: a user types
   "My dentist is Dr." with or without a trailing space.
5. **The boundary space belongs to the answer.** A byte-level BPE tokenizer (GPT-2, Llama 3,
   Qwen2, the tiny model's) keeps a word's leading space in the word's token (" Akeredolu"), so
   the natural prompt "My dentist is Dr." is followed by " Akeredolu", never by "Akeredolu"
   after a trigger that ends in a space token. So the answer is stripped of leading whitespace
   and gets exactly one leading space when the fact log put whitespace at the boundary
   (``"My dentist is Dr. " + "Akeredolu"``, ``"My dentist is Dr." + " Akeredolu"``) or when it
   put none between a trigger ending in a letter, digit or closing punctuation
   (``.,:;!?)]}%``) and an answer that opens a word: a letter or digit, a currency sign, an
   opening bracket, a quote or apostrophe (``' " ’``) before a letter or digit (not ``'s``,
   ``'re`` and the other contractions), ``# ¿ ¡``, an emoji, a signed number, or ``@`` that does
   not end an email address (``@name.domain`` after a word ends one, unless that word is a
   function word or a handle's name, ``"My Instagram is" + "@jane.doe"``)
   (``"...city of" + "Lisbon"`` is "...city of Lisbon", not "...ofLisbon";
   ``"My budget is" + "$500"``, ``"class of" + "'98"``, ``"My handle is" + "@jane"``,
   ``"The low is" + "-5"``). Otherwise the two join without a space (``"My email is jane" +
   "@example.org"``, ``"Flight AB-" + "1234"``, ``"costs $" + "12"``), and always after a
   character of a script written without spaces between words (Chinese, Japanese, Thai, Lao,
   Khmer, Myanmar, Tibetan) or CJK / full-width punctuation: ``"我住在" + "东京"`` is "我住在东京"
   (Hangul and full-width Latin letters are spaced; a unit sign such as ``°`` joins its number).
   Measured on the tiny model (tests/test_text.py): the natural prompt recalls the answer with
   this rule and not with the stored split.
6. **Ids** (user_id, fact_id, scope) follow rules 1-3, with every format character removed
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
# Trigger endings after which a letter or digit starts a new word when the log put no space.
_WORD_END_PUNCTUATION = frozenset(".,:;!?)]}%")


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
    space separators as one U+0020, CR LF and CR as LF. Not stripped. Idempotent."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
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


def canonical_prompt(text: str) -> str:
    """A prompt as the model sees it at serve time: :func:`canonical_text`, stripped (rule 4)."""
    return canonical_text(text).strip()


def canonical_id(value: str) -> str:
    """A user_id, fact_id or scope in its canonical form (rule 6); may return "" (then rejected)."""
    return canonical_text(value, keep_joiners=False).strip()


# Scripts written without spaces between words (Han, kana, bopomofo, Thai, Lao, Khmer, Myanmar,
# Tibetan), CJK punctuation and the full-width punctuation and half-width katakana: after one of
# these, no space is inserted. Hangul (Korean is written with spaces) and full-width Latin letters
# and digits are not among them.
_UNSPACED = ((0x0E00, 0x0EFF), (0x0F00, 0x0FFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x2E80, 0x312F),
             (0x3190, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFE30, 0xFE4F),
             (0xFF01, 0xFF0F), (0xFF1A, 0xFF20), (0xFF3B, 0xFF40), (0xFF5B, 0xFF9F), (0x20000, 0x3FFFF))
# Answer starts that open a word after a word of the trigger (with a letter or digit, and any
# currency sign or opening bracket or quote): "costs" + "$12", "motto is" + '"carpe diem"',
# "class of" + "'98", "Room" + "#12", "¿" and "¡".
_WORD_START_PUNCTUATION = frozenset("#¿¡")
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
    me my our your his her their its the a an and or called named
    handle handles username usernames user name nickname account profile id tag gamertag alias
    instagram twitter tiktok threads telegram github gitlab mastodon bluesky discord reddit snapchat
    youtube twitch linkedin facebook slack signal skype keybase
    ist es est är er jest è é
""".split())


def _unspaced(char: str) -> bool:
    code = ord(char)
    return code >= 0x0E00 and any(low <= code <= high for low, high in _UNSPACED)


def _opens_word(char: str) -> bool:
    """A letter or digit, a currency sign, an opening bracket or quote, # ¿ ¡, or an emoji (the
    pictographic blocks; not ° or ©, which follow a number or word without a space)."""
    if char.isalnum() or char in _WORD_START_PUNCTUATION:
        return True
    code = ord(char)
    return unicodedata.category(char) in ("Sc", "Ps", "Pi") or 0x1F000 <= code <= 0x1FAFF or 0x2600 <= code <= 0x27BF


def _space_between(trigger: str, answer: str) -> bool:
    """Rule 5 when the log put no whitespace at the boundary."""
    start, trigger_end = answer[0], trigger[-1]
    if _unspaced(trigger_end) or not (trigger_end.isalnum() or trigger_end in _WORD_END_PUNCTUATION):
        return False
    if start in _QUOTES:  # an opening quote (a word or a number follows), not a closing one or "'s"
        return answer[1:2].isalnum() and not _CONTRACTION.match(answer)
    if _opens_word(start):
        return True
    if start in "-+\u2212":  # a signed number: "The low is" + "-5"
        return answer[1:2].isdecimal()
    # "My handle is" + "@jane" opens a word; "My email is jane" + "@example.org" ends an address,
    # unless the trigger's last word is one no address starts with ("My Instagram is" + "@jane.doe")
    if start != "@":
        return False
    if not (trigger_end.isalnum() and _EMAIL_DOMAIN.match(answer)):
        return True
    return trigger.rsplit(None, 1)[-1].lower() in _BEFORE_A_HANDLE


def canonical_fact(trigger: str, answer: str) -> tuple[str, str]:
    """(trigger, answer) in canonical form (rules 1-5). ``trigger`` is what a user types
    (:func:`canonical_prompt` of it is itself); ``answer`` carries the boundary space. Empty
    texts stay empty (ingest rejects them)."""
    if (answer[:1] == " " and trigger.isascii() and answer.isascii() and "  " not in trigger and "  " not in answer
            and trigger[:1] > " " and trigger[-1:] > " " and answer[1:2] > " " and answer[-1:] > " "
            and "\r" not in trigger and "\r" not in answer):
        return trigger, answer  # already canonical (most facts): no copy
    trigger, answer = canonical_text(trigger), canonical_text(answer)
    spaced = trigger[-1:].isspace() or answer[:1].isspace()
    trigger, answer = trigger.strip(), answer.strip()
    if trigger and answer and (spaced or _space_between(trigger, answer)):
        answer = " " + answer
    return trigger, answer
