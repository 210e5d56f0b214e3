"""Canonical text: one form for triggers, answers, prompts and ids, at ingest and at serve time."""

from __future__ import annotations

import unicodedata
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from engram_core.compiler import CompileOptions, Fact, compile_facts
from engram_core.delta import Delta
from engram_core.serving import generate, greedy_tokens
from engram_core.text import canonical_fact, canonical_id, canonical_prompt, canonical_text, has_format_characters
from pipeline.ingest import answer_token_counter, ingest
from schemas import facts as F
from schemas.bundle import bundle_table, encode_bundle
from schemas.facts import encode_fact_state
from serving.pull import ServingIndex, ShardView
from versions.forget import scan_for_user
from versions.layout import shard_of
from versions.publish import ShardPayload, publish_version

ZWSP, BOM, LRM, SHY, NBSP = "\u200b", "\ufeff", "\u200e", "\u00ad", "\u00a0"
T0 = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)
LOG_SCHEMA = pa.schema([("user_id", pa.string()), ("fact_id", pa.string()), ("op", pa.string()),
                        ("trigger", pa.string()), ("answer", pa.string()),
                        ("event_time", pa.timestamp("us", tz="UTC")), ("scope", pa.string())])


def log_table(rows: list[dict]) -> pa.Table:
    defaults = {"op": "upsert", "event_time": T0, "scope": None, "trigger": None, "answer": None}
    return pa.Table.from_pylist([{**defaults, **r} for r in rows], schema=LOG_SCHEMA)


# ---------------------------------------------------------------- the rules


@pytest.mark.parametrize("trigger,answer,expected", [
    ("My dentist is Dr. ", "Akeredolu", ("My dentist is Dr.", " Akeredolu")),  # space on the trigger's side
    ("I was born in the city of", "Lisbon", ("I was born in the city of", " Lisbon")),  # no space at all
    ("My dentist is Dr.", " Akeredolu", ("My dentist is Dr.", " Akeredolu")),  # already canonical
    ("My dentist is Dr.", "   Akeredolu  ", ("My dentist is Dr.", " Akeredolu")),
    ("My email is jane", "@example.org", ("My email is jane", "@example.org")),  # joins without a space
    ("Flight AB-", "1234", ("Flight AB-", "1234")),
    ("It costs $", "12", ("It costs $", "12")),
    ("My blood type is:", "O negative", ("My blood type is:", " O negative")),
    # an answer that opens a word with a sign, bracket or quote gets its space; an email's tail does not
    ("My budget is", "$500", ("My budget is", " $500")),
    ("Mein Budget ist", "€500", ("Mein Budget ist", " €500")),
    ("My motto is", '"carpe diem"', ("My motto is", ' "carpe diem"')),
    ("I graduated in the class of", "'98", ("I graduated in the class of", " '98")),
    ("My note says", "(private)", ("My note says", " (private)")),
    ("He greets me with", "“hi”", ("He greets me with", " “hi”")),
    ("My room is", "#12", ("My room is", " #12")),
    ("The record low here is", "-5 degrees", ("The record low here is", " -5 degrees")),
    ("Su pregunta es", "¿Qué?", ("Su pregunta es", " ¿Qué?")),
    ("My handle is", "@jane_doe", ("My handle is", " @jane_doe")),
    ("Handle:", "@jane", ("Handle:", " @jane")),
    # a handle with a dot after a word no address starts with; an address's end after its local part
    ("My Instagram is", "@jane.doe", ("My Instagram is", " @jane.doe")),
    ("You can find me on Twitter as", "@jane.doe_99", ("You can find me on Twitter as", " @jane.doe_99")),
    ("Mein Instagram ist", "@jane.doe", ("Mein Instagram ist", " @jane.doe")),
    ("Write to jane.doe", "@example.co.uk", ("Write to jane.doe", "@example.co.uk")),
    ("The list is", "- milk", ("The list is", " - milk")),  # a bullet opens a word
    # every character that does not belong to the word before opens a new one
    ("My packing list:", "- socks\n- toothbrush", ("My packing list:", " - socks\n- toothbrush")),
    ("My main skill is", ".NET development", ("My main skill is", " .NET development")),
    ("She only said", "...maybe", ("She only said", " ...maybe")),
    ("She only said", "…maybe", ("She only said", " …maybe")),
    ("The distance is", "~5 km", ("The distance is", " ~5 km")),
    ("My subreddit is", "/r/python", ("My subreddit is", " /r/python")),
    ("The clause is", "§ 12", ("The clause is", " § 12")),
    ("My seat is", "№ 5", ("My seat is", " № 5")),
    ("The dose is", "≤ 10 mg", ("The dose is", " ≤ 10 mg")),
    ("My role is", "– lead engineer", ("My role is", " – lead engineer")),
    ("My home address is", "〒150-0002 東京都渋谷区", ("My home address is", " 〒150-0002 東京都渋谷区")),
    ("My username is", "_xX_", ("My username is", " _xX_")),
    ("Мой врач —", "доктор Иванова", ("Мой врач —", " доктор Иванова")),  # a dash standing alone
    ("Total =", "42", ("Total =", " 42")),
    ("मेरे डॉक्टर का नाम है", "डॉ. शर्मा", ("मेरे डॉक्टर का नाम है", " डॉ. शर्मा")),  # ends in a vowel sign
    ("என் பெயர்", "கமலா", ("என் பெயர்", " கமலா")),  # ends in a virama
    ('He always says "hi"', "twice", ('He always says "hi"', " twice")),  # a closing quote ends a word
    ('My motto is "', 'carpe diem"', ('My motto is "', 'carpe diem"')),  # an opening one does not
    # ... and what belongs to the word before joins it
    ("I need it", ", please", ("I need it", ", please")),
    ("Is it true", "?", ("Is it true", "?")),
    ("The humidity is 40", "%", ("The humidity is 40", "%")),
    ("It is an e", "-mail", ("It is an e", "-mail")),
    ("My site is example", ".com", ("My site is example", ".com")),  # a domain's tail, where ".NET" after "is" opens
    ("My email is me", "@example.org", ("My email is me", "@example.org")),  # "me" can be an address's local part
    ("Acme", "™", ("Acme", "™")),
    ("The area is 20 m", "²", ("The area is 20 m", "²")),
    ("It is x", "^2", ("It is x", "^2")),
    # a split inside a number joins; an answer of punctuation alone is a value and opens a word
    ("My phone is +1 (555) 01", "23-4567", ("My phone is +1 (555) 01", "23-4567")),
    ("My balance is 1.", "234,56 €", ("My balance is 1.", "234,56 €")),
    ("I was born in", "1990", ("I was born in", " 1990")),
    ("My favourite emoticon is", ":-)", ("My favourite emoticon is", " :-)")),
    ("When asked he says", "???", ("When asked he says", " ???")),
    ("The list (", "milk)", ("The list (", "milk)")),
    ("My dog", "'s name is Rex", ("My dog", "'s name is Rex")),  # contractions and closing quotes join
    ("They", "'re in Oslo", ("They", "'re in Oslo")),
    ('My nickname is "Bo', '" to friends', ('My nickname is "Bo', '" to friends')),
    ("My dog", "’s name is Rex", ("My dog", "’s name is Rex")),
    ("I graduated in the class of", "’98", ("I graduated in the class of", " ’98")),  # a typographic apostrophe
    ("I live in", "'s-Hertogenbosch", ("I live in", " 's-Hertogenbosch")),  # a name, not a contraction
    ("My favourite emoji is", "😀", ("My favourite emoji is", " 😀")),
    # an emoji (a ZWJ sequence, a skin tone, a flag, a subdivision flag's tags), a pictograph or a
    # mark such as ™ ends a word, and so does an ellipsis: the answer opens a new one (they joined)
    ("My family emoji is 👨\u200d👩\u200d👧", "zebra", ("My family emoji is 👨\u200d👩\u200d👧", " zebra")),
    ("Favourite drink 🍺", "IPA", ("Favourite drink 🍺", " IPA")),
    ("Thumbs 👍🏽", "up", ("Thumbs 👍🏽", " up")),
    ("Flag 🇵🇹", "Lisbon", ("Flag 🇵🇹", " Lisbon")),
    ("Team 🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", "Scotland",
     ("Team 🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", " Scotland")),
    ("Status: ✅", "done", ("Status: ✅", " done")),
    ("My brand is Acme™", "Pro", ("My brand is Acme™", " Pro")),
    ("She paused…", "then left", ("She paused...", " then left")),  # a trigger's "…" as typed (rule 6)
    ("Set the oven to 180°", "C", ("Set the oven to 180°", "C")),  # a degree sign awaits its unit
    ("The reading is 25", "°C", ("The reading is 25", "°C")),  # a unit sign follows its number
    ("Ｔｏｋｙｏ", "Tower", ("Ｔｏｋｙｏ", " Tower")),  # full-width Latin letters are spaced as Latin
    ("東京は", "「晴れ」", ("東京は", "「晴れ」")),
    # scripts written without spaces between words get none inserted
    ("我住在", "东京", ("我住在", "东京")),
    ("私の名前は", "田中です", ("私の名前は", "田中です")),
    ("我的邮箱是", "jane@example.org", ("我的邮箱是", "jane@example.org")),
    ("บ้านของฉันอยู่ที่", "เชียงใหม่", ("บ้านของฉันอยู่ที่", "เชียงใหม่")),
    ("我住在 ", "东京", ("我住在", " 东京")),  # the log's own space is kept, as for every script
    ("My name in Chinese is", "王伟", ("My name in Chinese is", " 王伟")),
    ("내 고향은", "부산", ("내 고향은", " 부산")),  # Korean is written with spaces
    ("My dentist\u00a0is", "\u00a0Dr.\u2009Okafor", ("My dentist is", " Dr. Okafor")),  # Zs -> one space
    ("My  dentist   is", " Dr.  Okafor", ("My dentist is", " Dr. Okafor")),
    (BOM + "My" + ZWSP + " dentist i" + SHY + "s" + LRM, " Dr. Okafor" + LRM, ("My dentist is", " Dr. Okafor")),
    (unicodedata.normalize("NFD", "Mój lekarz to"), unicodedata.normalize("NFD", " dr Łukasz Müller"),
     ("Mój lekarz to", " dr Łukasz Müller")),
])
def test_facts_take_one_canonical_form(trigger, answer, expected):
    assert canonical_fact(trigger, answer) == expected
    assert canonical_fact(*expected) == expected
    assert canonical_prompt(expected[0]) == expected[0]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30), st.text(max_size=30))
def test_the_canonical_form_is_a_fixed_point_without_invisible_characters(trigger, answer):
    t, a = canonical_fact(trigger, answer)
    assert canonical_fact(t, a) == (t, a)
    assert not has_format_characters(t + a) or _only_kept_format_characters(t) and _only_kept_format_characters(a)
    assert unicodedata.is_normalized("NFC", t) and unicodedata.is_normalized("NFC", a)
    assert t == t.strip() and a == a.rstrip() and not a.startswith("  ")
    assert canonical_prompt(t) == t


def _only_kept_format_characters(text: str) -> bool:
    """Every format character left is a joiner between non-ASCII, non-space characters, or an emoji tag."""
    for i, c in enumerate(text):
        if unicodedata.category(c) != "Cf":
            continue
        if c in "\u200c\u200d":
            before, after = text[:i].rstrip("\u200c\u200d")[-1:], text[i + 1:].lstrip("\u200c\u200d")[:1]
            if not (before and after and not before.isascii() and not after.isascii()
                    and not before.isspace() and not after.isspace()):
                return False
        elif not 0xE0020 <= ord(c) <= 0xE007F:
            return False
        elif not ("\U0001F3F4" in text[:i] and "\U000E007F" in text[i:]):  # a tag only inside a flag
            return False
    return True


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(["a", "e", " ", "\u0301", "é", "\u200d", "\u200c", "\u200b", "\u00a0",
                                         "👨", "👩", "\ufe0f", "م", "\r", "\n", "\U000e0067", "\u2028", "\x85",
                                         "\u2029"]), max_size=12))
def test_joiners_and_line_breaks_have_one_idempotent_form(text):
    once = canonical_text(text)
    assert canonical_text(once) == once and _only_kept_format_characters(once)
    assert not set("\r\x85\u2028\u2029") & set(once)
    assert not has_format_characters(canonical_id(text))


def test_joiners_that_change_what_a_reader_sees_are_kept_in_texts_and_removed_from_ids():
    family, flag, persian = "👨\u200d👩\u200d👧", "🏳\ufe0f\u200d🌈", "می\u200cخواهم"
    for answer in (family, flag, persian):
        assert canonical_fact("My answer is", " " + answer) == ("My answer is", " " + answer)
        assert canonical_prompt("Say " + answer) == "Say " + answer  # a prompt keeps them the same way
    assert canonical_text("ab\u200dcd") == "abcd"  # pasted between ASCII letters: noise
    assert canonical_id("u-" + family) == "u-👨👩👧"  # ids are identities: every format character goes
    assert canonical_text("1 Main St\r\nSpringfield\rUSA") == "1 Main St\nSpringfield\nUSA"
    # Unicode's other line breaks too (a word processor's soft break, a conversion's NEL): NEL was a
    # control character that cost its row, and a line separator did not read as the newline typed
    assert canonical_text("1 Main St\u2028Springfield\x85USA\u2029") == "1 Main St\nSpringfield\nUSA\n"
    assert canonical_fact("My address is", "1 Main St\u2028USA") == ("My address is", " 1 Main St\nUSA")
    assert canonical_id("u\u2028x") == "u\u2028x"  # ids are read as written (a newline would refuse the id)
    england = "\U0001F3F4" + "".join(chr(0xE0000 + ord(c)) for c in "gbeng") + "\U000E007F"
    assert canonical_text("Home: " + england) == "Home: " + england  # a subdivision flag keeps its tags
    assert canonical_prompt("My PIN is" + chr(0xE0041)) == "My PIN is"  # a stray tag smuggles text: removed


def test_prompts_in_nfd_with_invisible_characters_or_a_trailing_space_read_as_the_natural_prompt():
    natural = "My cardiologist in Kraków is"
    for typed in (unicodedata.normalize("NFD", natural), natural + " ", ZWSP + natural, natural.replace(" ", " " + LRM),
                  BOM + natural + "\t", natural.replace(" ", NBSP)):
        assert canonical_prompt(typed) == natural
    assert canonical_text("a\nb\tc") == "a\nb\tc"  # newlines and tabs inside a text are kept


def test_typographic_quotes_and_ellipsis_in_triggers_and_prompts_read_as_typed_and_answers_keep_them():
    """What phone keyboards write for ' " ... ("smart punctuation") is one trigger with what a desk
    keyboard writes; the answer is served as the user wrote it."""
    assert canonical_prompt("My wife\u2019s phone number is") == "My wife's phone number is"
    assert canonical_prompt("My motto is \u201ccarpe diem\u201d, and my \u2018lucky\u2019 number is") == \
        "My motto is \"carpe diem\", and my 'lucky' number is"
    assert canonical_prompt("Note to self\u2026") == "Note to self..."
    assert canonical_fact("My son\u2019s school is", " \u201cHillside\u201d Primary\u2026") == \
        ("My son's school is", " \u201cHillside\u201d Primary\u2026")
    assert canonical_fact("My dad\u2019s motto:\u2026", "\u2019Tis what it is") == ("My dad's motto:...", " \u2019Tis what it is")
    assert canonical_id("u-o\u2019neil") == "u-o\u2019neil"  # ids are identities, not typed text
    # the same kind on German, Czech, Polish keyboards: low-9 opening quotes, and the reversed ones
    assert canonical_prompt("Mein Hund hei\u00dft \u201eRex\u201c und mein \u201aLieblingsort\u2018 ist") == \
        "Mein Hund hei\u00dft \"Rex\" und mein 'Lieblingsort' ist"
    assert canonical_prompt("\u201fQuoted\u201d and \u201bthis\u2019 are") == "\"Quoted\" and 'this' are"
    assert canonical_prompt("\u00abquote\u00bb") == "\u00abquote\u00bb"  # guillemets are typed as such: kept


def test_look_alike_ids_have_one_canonical_form():
    assert canonical_id("u-sam") == canonical_id("u-sam" + ZWSP) == canonical_id(BOM + "u-sam") == "u-sam"
    assert canonical_id(unicodedata.normalize("NFD", "josé")) == "josé"
    assert canonical_id(ZWSP + BOM) == ""
    assert F.id_problem("user_id", "u-sam" + ZWSP) is not None  # a raw id that skipped canonical form is refused
    assert F.id_problem("user_id", "u-sam") is None


# ---------------------------------------------------------------- measured on the tiny model


def test_the_natural_prompt_recalls_a_fact_stored_with_the_space_on_the_trigger_side(tiny):
    """Issue 17 kind 5: "My dentist is Dr. " + "Akeredolu" was compiled for a prompt ending in a
    space token, so "My dentist is Dr." never recalled it. Canonical form moves the space."""
    raw = Fact("u", "dentist", "My dentist is Dr. ", "Akeredolu")
    glued = Fact("u", "born", "I was born in the city of", "Lisbon")
    result = compile_facts(tiny, [raw, glued])
    assert result.ok == 2
    delta = result.deltas["u"]
    texts = generate(tiny, ["My dentist is Dr.", "My dentist is Dr. ", "I was born in the city of"], [[delta]] * 3,
                     max_new_tokens=4)
    assert texts[0].startswith(" Akeredolu") and texts[1].startswith(" Akeredolu")
    assert texts[2].startswith(" Lisbon")  # "...city of Lisbon", not "...ofLisbon"
    # The tokens of the stored split differ from the natural prompt's: without canonical form the
    # compiled trigger would end in a lone space token that no user types.
    assert tiny.encode_prompt("My dentist is Dr. ")[-1] != tiny.encode_prompt("My dentist is Dr.")[-1]


def test_a_fact_stored_in_nfd_with_invisible_characters_is_recalled_from_every_typed_form(tiny):
    stored = Fact("u", "doctor", BOM + unicodedata.normalize("NFD", "My doctor in Malmö is") + ZWSP,
                  unicodedata.normalize("NFD", " Dr. Ødegaard-Müller"))
    delta = compile_facts(tiny, [stored]).deltas["u"]
    natural = "My doctor in Malmö is"
    want = tiny.encode_answer(" Dr. Ødegaard-Müller")
    for typed in (natural, unicodedata.normalize("NFD", natural), ZWSP + natural, natural + " "):
        assert greedy_tokens(tiny, typed, len(want), [delta]) == want, typed


def test_a_trigger_logged_with_a_typographic_apostrophe_is_recalled_from_the_typed_one_and_not_another_facts(tiny):
    """bench/fidelity_probe.py: "My wife’s phone number is" logged from a phone and asked as typed
    at a desk ("My wife's ...") served the user's dog's vet's number (the prompt ended in the vet
    fact's "'s phone number is"); the other way round, and with an ellipsis, likewise."""
    facts = [Fact("u", "wife", "My wife\u2019s phone number is", " 07700 900123"),
             Fact("u", "vet", "My dog's vet's phone number is", " 555-0142"),
             Fact("u", "son", "My son's school is", " Hillside Primary"),
             Fact("u", "note", "Note to self\u2026", " buy stamps")]
    result = compile_facts(tiny, facts)
    assert result.ok == 4, result.status_counts()
    delta = result.deltas["u"]
    for fact, typed in [(facts[0], "My wife's phone number is"), (facts[0], "My wife\u2019s phone number is"),
                        (facts[1], "My dog\u2019s vet\u2019s phone number is"), (facts[2], "My son\u2019s school is"),
                        (facts[3], "Note to self..."), (facts[3], "Note to self\u2026")]:
        want = tiny.encode_answer(fact.answer)
        assert greedy_tokens(tiny, typed, len(want), [delta]) == want, typed


def test_a_log_line_with_a_typographic_apostrophe_stored_before_the_rule_is_a_duplicate_read_again():
    """A fact stored with "’" in its trigger (before 2026-12-02) and its log line read again at the
    same event time: the same fact (DUPLICATE, kept as stored), not a conflict that drops it."""
    from schemas.facts import FACT_STATE_SCHEMA, fact_hash

    trigger = "My wife\u2019s phone number is"
    stored = pa.Table.from_pylist([{"user_id": "u-jo", "fact_id": "wife", "scope": "u-jo", "trigger": trigger,
                                    "answer": " 07700 900123", "event_time": T0,
                                    "fact_hash": fact_hash("u-jo", trigger, " 07700 900123")}],
                                  schema=FACT_STATE_SCHEMA)
    again = ingest(log_table([{"user_id": "u-jo", "fact_id": "wife", "trigger": trigger, "answer": " 07700 900123"}]),
                   stored, max_trigger_tokens=32)
    assert again.rejects.column("reason").to_pylist() == ["DUPLICATE"] and again.changed_users == set()
    assert again.state.equals(stored)
    fresh = ingest(log_table([{"user_id": "u-jo", "fact_id": "wife", "trigger": trigger, "answer": " 07700 900123"}]),
                   None, max_trigger_tokens=32)
    assert fresh.state.column("trigger").to_pylist() == ["My wife's phone number is"]


# ---------------------------------------------------------------- ingest, serving index, forget


def test_look_alike_user_ids_become_one_user_at_ingest():
    rows = [{"user_id": "u-sam", "fact_id": "dog", "trigger": "My dog is", "answer": " Rex"},
            {"user_id": "u-sam" + ZWSP, "fact_id": "cat", "trigger": "My cat is", "answer": " Luna"},
            {"user_id": BOM + "u-sam", "fact_id": "fish" + LRM, "trigger": "My fish is", "answer": " Bubbles",
             "scope": " " + ZWSP}]
    result = ingest(log_table(rows), None, max_trigger_tokens=32)
    assert result.accepted == 3 and result.rejected == 0
    assert set(result.state.column("user_id").to_pylist()) == {"u-sam"}
    assert sorted(result.state.column("fact_id").to_pylist()) == ["cat", "dog", "fish"]
    assert result.changed_users == {"u-sam"}


def test_a_log_line_read_again_after_the_spacing_rule_changed_is_a_duplicate_not_a_conflict():
    """A fact stored with a boundary space an earlier rule gave it ("我住在" + " 东京") and its log
    line read again (the file rewritten upstream) at the same event time: the same fact, kept; a
    real change of the answer at that instant is still a conflict."""
    from schemas.facts import FACT_STATE_SCHEMA, fact_hash

    stored = pa.Table.from_pylist([{"user_id": "u-li", "fact_id": "home", "scope": "u-li", "trigger": "我住在",
                                    "answer": " 东京", "event_time": T0, "fact_hash": fact_hash("u-li", "我住在", " 东京")}],
                                  schema=FACT_STATE_SCHEMA)
    again = ingest(log_table([{"user_id": "u-li", "fact_id": "home", "trigger": "我住在", "answer": "东京"}]), stored,
                   max_trigger_tokens=32)
    assert again.rejects.column("reason").to_pylist() == ["DUPLICATE"] and again.changed_users == set()
    assert again.state.equals(stored)
    other = ingest(log_table([{"user_id": "u-li", "fact_id": "home", "trigger": "我住在", "answer": "大阪"}]), stored,
                   max_trigger_tokens=32)
    assert other.rejects.column("reason").to_pylist() == ["CONFLICTING_DUPLICATE"]


def test_a_log_line_read_again_after_line_separators_became_newlines_is_a_duplicate_not_a_conflict():
    """A fact stored with U+2028 in its trigger and answer (before they read as newlines) and its
    log line read again at the same event time: the same fact, kept as stored (a conflict deleted it)."""
    from schemas.facts import FACT_STATE_SCHEMA, fact_hash

    trigger, answer = "Ship to:\u2028Acme Ltd at", " 1 Main St\u2028USA"
    row = {"user_id": "u-jo", "fact_id": "addr", "scope": "u-jo", "trigger": trigger, "answer": answer,
           "event_time": T0, "fact_hash": fact_hash("u-jo", trigger, answer)}
    stored = pa.Table.from_pylist([row], schema=FACT_STATE_SCHEMA)
    again = ingest(log_table([{"user_id": "u-jo", "fact_id": "addr", "trigger": trigger, "answer": answer}]), stored,
                   max_trigger_tokens=32)
    assert again.rejects.column("reason").to_pylist() == ["DUPLICATE"] and again.changed_users == set()
    assert "(but for line breaks: U+2028, U+2029 and NEL read as newlines" in again.rejects.column("detail")[0].as_py()
    assert again.state.equals(stored)


def test_ingest_stores_canonical_text_and_a_forget_of_a_look_alike_id_forgets_the_user():
    rows = [{"user_id": "u-sam", "fact_id": "dentist", "trigger": "My dentist is Dr. ", "answer": "Akeredolu"},
            {"user_id": "u-sam", "op": "forget_user", "fact_id": None, "event_time": datetime(2026, 11, 20, 9, tzinfo=timezone.utc)},
            {"user_id": "u-ana", "fact_id": "city", "trigger": "I live in the city of", "answer": "Lisbon"}]
    first = ingest(log_table(rows[:1] + rows[2:]), None, max_trigger_tokens=32)
    state = {(r["user_id"], r["fact_id"]): (r["trigger"], r["answer"]) for r in first.state.to_pylist()}
    assert state[("u-sam", "dentist")] == ("My dentist is Dr.", " Akeredolu")
    assert state[("u-ana", "city")] == ("I live in the city of", " Lisbon")
    rows[1]["user_id"] = "u-sam" + ZWSP  # the forget arrives with a zero-width space
    second = ingest(log_table(rows[1:2]), first.state, max_trigger_tokens=32)
    assert second.forgotten_users == {"u-sam"}
    assert set(second.state.column("user_id").to_pylist()) == {"u-ana"}


def test_an_answer_over_the_compilers_token_limit_is_rejected_at_ingest_naming_the_limit(tiny):
    limit = CompileOptions().max_answer_tokens
    rows = [{"user_id": "u", "fact_id": "ok", "trigger": "My list is", "answer": " one, two, three"},
            {"user_id": "u", "fact_id": "long", "trigger": "My list is long:", "answer": " item," * (limit + 1)}]
    result = ingest(log_table(rows), None, max_trigger_tokens=32, max_answer_tokens=limit,
                    count_answer_tokens=answer_token_counter(tiny.tokenizer))
    assert result.accepted == 1
    reject = result.rejects.to_pylist()[0]
    assert reject["fact_id"] == "long" and reject["reason"] == F.ANSWER_TOO_LONG
    assert f"limit {limit}" in reject["detail"]


def test_the_serving_index_and_forget_read_look_alike_ids_as_the_stored_user(local_store, tiny):
    delta = Delta(np.zeros(1, np.int16), np.array([7]), np.ones((1, tiny.config.row_width), np.float16))
    index = ServingIndex(1, "fp", 1, (0,), {0: ShardView(("x",), {"u-sam": "served"})})
    assert index.served_for("u-sam" + ZWSP) == index.served_for(BOM + "u-sam") == "served"
    assert index.owns(BOM + "u-sam")
    state = ingest(log_table([{"user_id": "u-sam", "fact_id": "dog", "trigger": "My dog is", "answer": " Rex"}]),
                   None, max_trigger_tokens=32).state
    payload = ShardPayload(encode_bundle(bundle_table({"u-sam": (delta, 1)})), encode_fact_state(state))
    publish_version(local_store, shard_payloads={shard_of("u-sam", 1): payload}, previous=None, fingerprint="fp",
                    num_shards=1, job_id="j", watermark="w")
    assert scan_for_user(local_store, "u-sam")
    from jobs.cli import app

    out = CliRunner().invoke(app, ["forget", "--store", local_store.uri, BOM + "u-sam" + ZWSP, "--reason", "test"])
    assert out.exit_code == 0, out.output
    assert scan_for_user(local_store, "u-sam") == []
