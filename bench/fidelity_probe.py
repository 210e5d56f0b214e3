"""Fidelity on users of kinds neither bench/fidelity.py nor bench/fidelity_fresh.py holds, run
through the product the same way (bench/fidelity_fresh.py's machinery: `engram run nightly` on a
local store, two nights, then every live fact asked as `engram ask` and as `engram serve`'s chat
asks it; the same counting of recall, leaks and stale answers).

Kinds (a fact may have several):

- prefix_trigger: triggers that are prefixes of another of the user's triggers ("My dog is" /
  "My dog is named" / "My dog's vet is").
- asked_nfd, asked_space: a trigger logged one way and typed another way that the README's
  canonical forms promise are one text (NFD accents, double / no-break spaces).
- asked_smart: curly vs straight quotes and apostrophes, "…" vs "...": what phone keyboards'
  "smart punctuation" writes for what the user typed (one text since 2026-12-02).
- asked_case, asked_punct: typed another way the canonical forms do not name: other case, a
  trailing colon, ellipsis or dash added or left out.
- short_answer: one-character answers ("7", "A", "é"); emoji_answer: a single emoji;
  newline_answer: an internal line break; punct_answer: answers starting with punctuation.
- third_person: a fact logged with the user's name ("Sam's dentist is") asked in first person,
  and the reverse.
- crowd: many users (``--crowd``, default 500) with facts from the same 20 templates and their
  own answers; one_template: a user whose 100+ facts nearly all share one template.
- one_digit: numbers that differ in one digit (account numbers, PINs, dates), within a user and
  between users of the crowd; update: a one-digit correction on night 2 (the old answer must
  never come back).

``--set kinds2`` (build_kinds2_corpus, three nights) holds other kinds: Devanagari, Thai, Greek,
Tamil, Georgian and mixed scripts; structured answers (multi-line addresses, phone formats,
emails, URLs with query strings, IBANs, dates); answers typed with trailing punctuation or
whitespace; question triggers asked as statements and the reverse; answers holding a trigger's
text; long triggers that end alike; a 326-fact user; facts logged twice under two fact_ids; answers
changed A -> B -> C and B -> A, deletes, re-adds the same night and a night later.

"asked" in the table is the trigger typed the other way (``Fact.prompts``); "prompt" the trigger
as logged.

    python bench/fidelity_probe.py --model DIR --workdir /tmp/probe --json
    python bench/fidelity_probe.py --crowd 50 --json          # a smaller crowd
    python bench/fidelity_probe.py --dump corpus.json         # just write the corpus
    python bench/fidelity_probe.py --set kinds2 --model DIR --workdir W --forms prompt asked chat

No asserts: results go to bench/RESULTS.md by hand, with date and machine.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import unicodedata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fidelity_fresh import FORMS, Fact, run_corpus  # noqa: E402


def _nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def _curly(text: str) -> str:
    return text.replace("'", "\u2019").replace('"', "\u201c", 1).replace('"', "\u201d", 1)


def _sam():
    """One user, many ways to type the same trigger, short and odd answers."""
    f = []

    def add(fid, trig, ans, kinds, prompts=()):
        f.append(Fact("u-sam", fid, trig, ans, kinds, tuple(prompts)))

    # triggers that are prefixes of others
    add("dog-is", "My dog is", " a beagle", ("prefix_trigger",))
    add("dog-named", "My dog is named", " Biscuit", ("prefix_trigger",))
    add("dog-vet", "My dog's vet is", " Dr. Hale", ("prefix_trigger",))
    add("dog-vet-phone", "My dog's vet's phone number is", " 555-0142", ("prefix_trigger", "one_digit"))
    add("car", "My car is", " a red Mazda 3", ("prefix_trigger",))
    add("car-plate", "My car is registered as", " KX19 BFE", ("prefix_trigger",))
    add("car-plate-old", "My car is registered in", " Leeds", ("prefix_trigger",))
    # typed another way than logged: promised one text
    add("cafe", "My favourite café is", " Café Nérée", ("asked_nfd",), [_nfd("My favourite café is")])
    add("resume", "My résumé is saved as", " cv-final.pdf", ("asked_nfd",), [_nfd("My résumé is saved as")])
    add("nbsp", "My gate code is", " 4417", ("asked_space",), ["My  gate code is", "My gate\u00a0code is",
                                                             " My gate code is  "])
    # typed another way: not named by the canonical forms
    add("dentist", "My dentist is", " Dr. Akeredolu", ("asked_case",), ["my dentist is", "MY DENTIST IS",
                                                                         "My Dentist Is"])
    add("son-school", "My son's school is", " Hillside Primary", ("asked_smart",), ["My son\u2019s school is"])
    add("wife-phone", "My wife\u2019s phone number is", " 07700 900123", ("asked_smart", "one_digit"),
        ["My wife's phone number is"])
    add("motto", 'My motto is "carpe diem", and my tattoo says', " the same", ("asked_smart",),
        ['My motto is \u201ccarpe diem\u201d, and my tattoo says'])
    add("daughter", "My daughter\u2019s teacher is", " Mr Brennan", ("asked_smart",), ["My daughter's teacher is"])
    add("son-teacher", "My son's teacher is", " Mrs Patel", ("asked_smart",), ["My son\u2019s teacher is"])
    add("note", "Note to self...", " call the plumber", ("asked_smart",), ["Note to self\u2026"])
    add("note2", "Reminder for tomorrow\u2026", " dentist at 9", ("asked_smart",), ["Reminder for tomorrow..."])
    add("pin", "My PIN is", " 4821", ("asked_punct", "one_digit"), ["My PIN is:", "My PIN is...", "My PIN is\u2026",
                                                                     "My PIN is -"])
    add("wifi", "The Wi-Fi password:", " hunter2", ("asked_punct",), ["The Wi-Fi password", "The Wi-Fi password :"])
    # short and odd answers
    add("lucky", "My lucky number is", " 7", ("short_answer",))
    add("grade", "My blood type is", " A", ("short_answer",))
    add("letter", "The last letter of my surname is", " é", ("short_answer",))
    add("size", "My shirt size is", " M", ("short_answer",))
    add("floor", "I live on floor", " 0", ("short_answer",))
    add("emoji-1", "My favourite emoji is", " 🦄", ("emoji_answer",))
    add("emoji-2", "My reaction to Mondays is", " 😩", ("emoji_answer",))
    add("emoji-3", "My team's flag is", " 🇧🇷", ("emoji_answer",))
    add("lines-1", "My address is", " 12 Elm Road\nBristol BS1 4DJ", ("newline_answer",))
    add("lines-2", "My signature reads", " Best,\nSam", ("newline_answer",))
    add("punct-1", "My pets are a dog", ", and also a cat named Miso", ("punct_answer",))
    add("punct-2", "When asked how I am, I say", " ...fine, thanks", ("punct_answer",))
    add("punct-3", "My favourite smiley is", " :-)", ("punct_answer", "short_answer"))
    add("punct-4", "My username ends with", " _99", ("punct_answer",))
    add("punct-5", "My shopping list starts with", " - milk\n- eggs", ("punct_answer", "newline_answer"))
    # third person
    add("third-1", "Sam's dentist appointment is on", " Tuesday at 3 p.m.", ("third_person",),
        ["My dentist appointment is on"])
    add("third-2", "My gym locker is", " number 118", ("third_person",), ["Sam's gym locker is"])
    # numbers one digit apart
    add("acct-1", "My checking account number is", " 40012345", ("one_digit",))
    add("acct-2", "My savings account number is", " 40012346", ("one_digit",))
    add("pin-card", "My debit card PIN is", " 4822", ("one_digit",))
    add("date-1", "My passport was issued on", " 2021-03-14", ("one_digit",))
    add("date-2", "My passport expires on", " 2031-03-14", ("one_digit",))
    add("date-3", "My visa expires on", " 2031-03-15", ("one_digit",))
    return f


def _one_template(rng: random.Random, n: int = 104):
    """A user whose facts nearly all share one template: n storage units and their codes (codes
    drawn so that many pairs differ in one digit)."""
    f = []
    base = [rng.randint(1000, 9999) for _ in range(n // 4)]
    for k in range(n):
        code = base[k // 4] + (k % 4)  # groups of 4 codes one digit (the last) apart
        f.append(Fact("u-lockers", f"unit-{k:03d}", f"The code for storage unit {k + 1} is", f" {code}",
                      ("one_template", "one_digit")))
    f.append(Fact("u-lockers", "manager", "The storage manager is", " Mrs Okafor", ("one_template",)))
    f.append(Fact("u-lockers", "hours", "The storage site opens at", " 7:30", ("one_template",)))
    return f


_TEMPLATES = [
    ("dentist", "My dentist is", lambda r: f" Dr. {r.choice(_SURNAMES)}"),
    ("doctor", "My doctor is", lambda r: f" Dr. {r.choice(_SURNAMES)}"),
    ("city", "I live in", lambda r: f" {r.choice(_CITIES)}"),
    ("employer", "I work at", lambda r: f" {r.choice(_SURNAMES)} & {r.choice(_SURNAMES)}"),
    ("partner", "My partner's name is", lambda r: f" {r.choice(_FIRST)}"),
    ("pet", "My dog's name is", lambda r: f" {r.choice(_FIRST)}"),
    ("birthday", "My birthday is", lambda r: f" {r.randint(1, 28)} {r.choice(_MONTHS)}"),
    ("phone", "My phone number is", lambda r: f" 07700 9{r.randint(10000, 99999)}"),
    ("pin", "My PIN is", lambda r: f" {r.randint(1000, 9999)}"),
    ("car", "My car is a", lambda r: f" {r.choice(_COLOURS)} {r.choice(_CARS)}"),
    ("allergy", "I am allergic to", lambda r: f" {r.choice(_ALLERGENS)}"),
    ("food", "My favourite food is", lambda r: f" {r.choice(_FOODS)}"),
    ("school", "My kid's school is", lambda r: f" {r.choice(_SURNAMES)} Primary"),
    ("gym", "My gym locker is", lambda r: f" {r.randint(1, 300)}"),
    ("blood", "My blood type is", lambda r: f" {r.choice(['A', 'B', 'AB', 'O'])}{r.choice('+-')}"),
    ("account", "My bank account number is", lambda r: f" {r.randint(10000000, 99999999)}"),
    ("team", "My favourite team is", lambda r: f" {r.choice(_CITIES)} FC"),
    ("shoe", "My shoe size is", lambda r: f" {r.randint(36, 47)}"),
    ("mother", "My mother's maiden name is", lambda r: f" {r.choice(_SURNAMES)}"),
    ("wifi", "My Wi-Fi password is", lambda r: f" {r.choice(_COLOURS)}{r.choice(_FIRST)}{r.randint(10, 99)}"),
]
_SURNAMES = ["Okafor", "Nguyen", "Patel", "Schmidt", "Rossi", "Kowalski", "Haddad", "Tanaka", "Brennan", "Moreau",
             "Silva", "Ivanova", "Akeredolu", "Lindqvist", "Mensah", "Dubois", "Fischer", "Khan", "Garcia", "Cohen"]
_FIRST = ["Ada", "Ben", "Cleo", "Dev", "Ezra", "Fern", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lena", "Milo", "Nia",
          "Otto", "Pia", "Rex", "Suki", "Theo", "Uma"]
_CITIES = ["Leeds", "Lisbon", "Lyon", "Lagos", "Lima", "Lille", "Linz", "Leipzig", "Lucca", "Luton", "Oslo", "Osaka"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_COLOURS = ["red", "blue", "green", "silver", "black", "white"]
_CARS = ["Mazda 3", "Golf", "Corolla", "Civic", "Model 3", "Clio", "Focus", "Yaris"]
_ALLERGENS = ["peanuts", "penicillin", "cats", "pollen", "shellfish", "latex", "eggs", "sesame"]
_FOODS = ["ramen", "paella", "pho", "lasagne", "tacos", "curry", "sushi", "pierogi", "jollof rice"]


def _crowd(rng: random.Random, users: int, per_user: int):
    """``users`` users, each with ``per_user`` facts from the same 20 templates, their own answers."""
    f = []
    for u in range(users):
        for fid, trig, answer in rng.sample(_TEMPLATES, per_user):
            f.append(Fact(f"u-crowd-{u:04d}", fid, trig, answer(rng), ("crowd",)))
    return f


def build_probe_corpus(seed: int = 0, crowd: int = 500, per_user: int = 4) -> dict:
    """Night 1: every fact; night 2: one-digit corrections (u-sam's PIN and account, a locker
    code, crowd PINs), a re-entry under a new fact_id, a delete."""
    rng = random.Random(seed)
    night1 = _sam() + _one_template(rng) + _crowd(rng, crowd, per_user)
    by_key = {(f.user_id, f.fact_id): f for f in night1}
    changes = {("u-sam", "pin"): " 4822", ("u-sam", "acct-1"): " 40012355", ("u-sam", "lucky"): " 8",
               ("u-sam", "emoji-1"): " 🐉", ("u-lockers", "unit-005"): None}
    crowd_pins = [k for k in by_key if k[0].startswith("u-crowd") and k[1] == "pin"][:10]
    changes.update({k: None for k in crowd_pins})
    night2, deletes = [], []
    for key, answer in changes.items():
        old = by_key[key]
        if answer is None:  # one digit moves
            digits = old.answer.strip()
            answer = " " + digits[:-1] + str((int(digits[-1]) + 1) % 10)
        night2.append(Fact(old.user_id, old.fact_id, old.trigger, answer, old.kinds + ("update",), old.prompts,
                           old_answers=(old.answer,)))
    old = by_key[("u-sam", "car")]
    night2.append(Fact("u-sam", "car-new", old.trigger, " a blue Golf", old.kinds + ("update",),
                       old_answers=(old.answer,)))
    deletes.append(by_key[("u-sam", "grade")])
    return {"nights": [night1, night2], "deletes": [[], deletes]}


# ----------------------------------------------------------------------------------------------
# --set kinds2: scripts, structured answers, answers as typed, nights of updates, duplicates,
# statement / question forms, triggers past the window, a 320-fact user, answers that hold a
# trigger again


def _scripts():
    """Devanagari, Thai, Greek, Tamil, Georgian; scripts mixed inside a trigger or an answer (Latin
    in Arabic / Hebrew / Cyrillic / CJK without spaces, CJK after Latin)."""
    return [
        ("hi-name", "मेरा नाम है", " अनन्या शर्मा", ("devanagari",)),
        ("hi-city", "मैं रहती हूँ", " जयपुर, राजस्थान में", ("devanagari",)),
        ("hi-doctor", "मेरे डॉक्टर का नाम है", " डॉ. विक्रम मेहता", ("devanagari",)),
        ("hi-phone", "मेरा फ़ोन नंबर है", " +91 98765 43210", ("devanagari", "mixed_script")),
        ("hi-email", "मेरा ईमेल पता है", " ananya.sharma@example.in", ("devanagari", "mixed_script")),
        ("hi-digits", "मेरी जन्मतिथि है", " १४ अगस्त १९९२", ("devanagari",)),
        ("th-name", "ชื่อของฉันคือ", "สมศรี ใจดี", ("thai",)),
        ("th-wifi", "รหัส WiFi ที่บ้านคือ", "Baan2024!", ("thai", "mixed_script")),
        ("th-place", "ร้านกาแฟที่ชอบอยู่ที่", "ถนนนิมมานเหมินท์ ซอย 9", ("thai", "mixed_script")),
        ("el-name", "Το όνομά μου είναι", " Ελευθερία Παπαδοπούλου", ("greek",)),
        ("el-city", "Μένω στη", " Θεσσαλονίκη, οδός Τσιμισκή 45", ("greek",)),
        ("ta-name", "என் பெயர்", " கார்த்திக் ராஜா", ("tamil",)),
        ("ka-name", "ჩემი სახელია", " ნინო ბერიძე", ("georgian",)),
        ("ar-email", "بريدي الإلكتروني هو", " fatima.haddad@example.ma", ("rtl", "mixed_script")),
        ("ar-car", "سيارتي من نوع", " Toyota Corolla موديل 2019", ("rtl", "mixed_script")),
        ("he-wifi", "הסיסמה של ה-WiFi שלי היא", " Shalom#2024", ("rtl", "mixed_script")),
        ("he-addr", "הכתובת שלי היא", " רחוב הרצל 12, Tel Aviv", ("rtl", "mixed_script")),
        ("ru-laptop", "Серийный номер моего MacBook Pro:", " C02XK1ZZJG5H", ("cyrillic", "mixed_script")),
        ("ru-mix", "Мой логин в Steam", " pyotr_the_great", ("cyrillic", "mixed_script")),
        ("zh-iphone", "我的iPhone密码是", "520131", ("cjk", "mixed_script")),
        ("zh-email", "我的Gmail邮箱是", "xiaoming.wang@gmail.com", ("cjk", "mixed_script")),
        ("ja-mail", "私のメールアドレスは", "hanako.tanaka@example.jp です", ("cjk", "mixed_script")),
        ("ja-mix", "好きなバンドは", "ONE OK ROCKとRADWIMPS", ("cjk", "mixed_script")),
        ("en-zh", "My name in Chinese is", " 王小明", ("cjk", "mixed_script")),
        ("en-ar", "My grandmother's name in Arabic is", " زينب", ("rtl", "mixed_script")),
    ]


def _structured():
    """Long structured answers: addresses with commas and line breaks, phone numbers in several
    formats, emails, URLs with query strings, IBANs, ISO and spelled-out dates, times."""
    return [
        ("addr-1", "My home address is", " Flat 3, 14 Elm Road,\nClifton, Bristol\nBS8 4DJ\nUnited Kingdom",
         ("structured", "newline_answer")),
        ("addr-2", "Ship my parcels to", " Attn: J. Doe, c/o Acme Ltd., 221B Baker St., London NW1 6XE, UK",
         ("structured",)),
        ("addr-3", "My office address:", "\nSuite 400\n1600 Amphitheatre Pkwy\nMountain View, CA 94043",
         ("structured", "newline_answer")),
        ("ph-1", "My mobile number is", " +44 7700 900461", ("structured", "phone")),
        ("ph-2", "My landline is", " (020) 7946 0958", ("structured", "phone")),
        ("ph-3", "My work phone is", " 020-7946-0959", ("structured", "phone")),
        ("ph-4", "My US number is", " +1.415.555.0132", ("structured", "phone")),
        ("ph-5", "The clinic's number is", " 0117 496 0000 ext. 2231", ("structured", "phone")),
        ("em-1", "My personal email is", " j.doe+bills@mail.example.com", ("structured", "email")),
        ("em-2", "My partner's email is", " Priya_Nair-88@example.co.in", ("structured", "email")),
        ("url-1", "My order tracking link is", " https://shop.example.com/track?order=58213&zip=BS84DJ&lang=en-GB",
         ("structured", "url")),
        ("url-2", "The school's calendar is at", " http://www.st-marys.example.sch.uk/calendar/2025-26/?term=autumn#week3",
         ("structured", "url")),
        ("iban-1", "My IBAN is", " GB33BUKB20201555555555", ("structured", "iban")),
        ("iban-2", "My savings IBAN is", " GB94 BARC 1020 1530 0934 59", ("structured", "iban")),
        ("iban-3", "My French account's IBAN is", " FR14 2004 1010 0505 0001 3M02 606", ("structured", "iban")),
        ("date-1", "My wedding anniversary is on", " the 3rd of May", ("structured", "date")),
        ("date-2", "My son was born on", " 2017-05-03", ("structured", "date")),
        ("date-3", "My MOT is due on", " 03/05/2026", ("structured", "date")),
        ("date-4", "My daughter's birthday is", " May 3rd, 2019", ("structured", "date")),
        ("time-1", "My train leaves at", " 14:30 from platform 4", ("structured", "date")),
        ("time-2", "My yoga class starts at", " 6:45 pm on Thursdays", ("structured", "date")),
    ]


def _as_typed():
    """Answers as a user types them: trailing full stop, trailing and leading spaces, a trailing
    line break, trailing "!" / "?" / "...", quotes around the value."""
    return [
        ("dog", "My dog's name is", " Rex.", ("answer_typed",)),
        ("cat", "My cat's name is", " Miso", ("answer_typed",)),
        ("hamster", "My hamster's name is", "   Nibbles   ", ("answer_typed",)),
        ("fish", "My goldfish is called", "Bubbles\n", ("answer_typed",)),
        ("horse", "My horse is called", " Storm!", ("answer_typed",)),
        ("parrot", "My parrot's name is", ' "Captain"', ("answer_typed",)),
        ("tortoise", "My tortoise is called", " Sheldon...", ("answer_typed",)),
        ("rabbit", "My rabbit is called", "\tThumper \n", ("answer_typed",)),
        ("snake", "My snake's name is", " Kaa?", ("answer_typed",)),
    ]


def _forms():
    """Triggers logged as questions and asked as statements, and the other way round."""
    return [
        ("q-dentist", "What is my dentist's name?", " Dr. Lindqvist", ("question_form",),
         ["My dentist's name is", "what is my dentist's name?", "What is my dentist's name"]),
        ("q-locker", "What's my locker number?", " 118", ("question_form",),
         ["My locker number is", "What is my locker number?"]),
        ("q-plumber", "Who is my plumber?", " Bob Rossi, 07700 900777", ("question_form",), ["My plumber is"]),
        ("s-allergy", "I am allergic to", " penicillin", ("statement_form",),
         ["What am I allergic to?", "I'm allergic to"]),
        ("s-bank", "My bank is", " Monzo", ("statement_form",), ["What is my bank?", "Which bank am I with?"]),
        ("s-anniv", "Our anniversary is", " 12 June", ("statement_form",), ["When is our anniversary?"]),
    ]


def _holds_trigger():
    """Answers that hold a trigger's text again: their own, or another fact's of the same user."""
    return [
        ("own-1", "I always say", " I always say what I mean", ("answer_holds_trigger",)),
        ("own-2", "My password hint is", " my password hint is the dog", ("answer_holds_trigger",)),
        ("own-3", "Remind me to", " call Mum, and remind me to buy milk", ("answer_holds_trigger",)),
        ("dog-named", "My dog is named", " Biscuit", ("answer_holds_trigger",)),
        ("sentence", "My favourite sentence is", " My dog is named Rex and he is a good boy",
         ("answer_holds_trigger",)),
        ("gym-is", "My gym is", " FitLife Clifton", ("answer_holds_trigger",)),
        ("note", "The note on the fridge says", " My gym is closed on Sunday", ("answer_holds_trigger",)),
    ]


_LONG_HEAD = ("Every time I come back from a long trip abroad I forget the same small things, so I am writing "
              "them down here where I will find them again: the spare keys are with the neighbour at number 12, "
              "the boiler needs its reset button held for ten seconds, and ")


def _long_triggers():
    """Triggers over the trigger window (CompileOptions.trigger_window): one long trigger, and
    pairs whose texts share a long tail and differ only in their first words."""
    return [
        ("long-1", _LONG_HEAD + "the code for the alarm panel by the front door is", " 2580",
         ("long_trigger",)),
        ("long-2", "For the house in Leeds: " + _LONG_HEAD + "the code that opens the garage is", " 1397",
         ("long_trigger", "long_shared_tail")),
        ("long-3", "For the flat in Porto: " + _LONG_HEAD + "the code that opens the garage is", " 4682",
         ("long_trigger", "long_shared_tail")),
    ]


_FIRST2 = ["Ada", "Ben", "Cleo", "Dev", "Ezra", "Fern", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lena", "Milo", "Nia",
           "Otto", "Pia", "Rex", "Suki", "Theo", "Uma", "Vera", "Wes", "Xena", "Yuri", "Zoe", "Arlo", "Bea", "Cruz",
           "Dina", "Eli", "Faye", "Gio", "Hugo", "Iris", "Jay", "Kira", "Leo", "Maya", "Noah", "Opal"]


def _big(rng: random.Random, n_people: int = 40):
    """A 320-fact user: 40 contacts x 8 facts (phone, email, birthday, city, employer, partner,
    pet, favourite food), plus their own 6."""
    facts = []
    for k, name in enumerate(_FIRST2[:n_people]):
        sur = _SURNAMES[k % len(_SURNAMES)]
        facts += [
            (f"c{k:02d}-phone", f"{name} {sur}'s phone number is", f" 07700 9{rng.randint(10000, 99999)}"),
            (f"c{k:02d}-email", f"{name} {sur}'s email is", f" {name.lower()}.{sur.lower()}{rng.randint(1, 99)}@example.com"),
            (f"c{k:02d}-bday", f"{name} {sur}'s birthday is", f" {rng.randint(1, 28)} {rng.choice(_MONTHS)}"),
            (f"c{k:02d}-city", f"{name} {sur} lives in", f" {rng.choice(_CITIES)}"),
            (f"c{k:02d}-job", f"{name} {sur} works at", f" {rng.choice(_SURNAMES)} & {rng.choice(_SURNAMES)}"),
            (f"c{k:02d}-partner", f"{name} {sur}'s partner is", f" {rng.choice(_FIRST)}"),
            (f"c{k:02d}-pet", f"{name} {sur}'s dog is called", f" {rng.choice(_FIRST)}"),
            (f"c{k:02d}-food", f"{name} {sur}'s favourite food is", f" {rng.choice(_FOODS)}"),
        ]
    facts += [("own-city", "I live in", " Lisbon"), ("own-job", "I work at", " Haddad & Silva"),
              ("own-dentist", "My dentist is", " Dr. Moreau"), ("own-pin", "My PIN is", " 9044"),
              ("own-car", "My car is a", " green Clio"), ("own-shoe", "My shoe size is", " 43")]
    return [(fid, t, a, ("big_user",)) for fid, t, a in facts]


def build_kinds2_corpus(seed: int = 0, big: int = 40) -> dict:
    """Three nights. Night 1: every fact (u-kinds: scripts, structured, as typed, forms, answers
    holding triggers, long triggers; u-kinds-twin: the same triggers, other answers; u-big: 320
    facts); the same fact logged twice under two fact_ids (a double submit). Night 2: answers
    changed (A -> B), a fact deleted, a fact deleted and entered again the same night, a fact
    entered and deleted the same night, one copy of a double-logged fact corrected. Night 3: B ->
    C, B -> A (back), the deleted fact entered again under its fact_id with a new answer."""
    rng = random.Random(seed)
    night1, kinds = [], {}

    def add(user, fid, trig, ans, kind, prompts=()):
        night1.append(Fact(user, fid, trig, ans, kind, tuple(prompts)))

    groups = _scripts() + _structured() + _as_typed() + _holds_trigger() + _long_triggers()
    for fid, trig, ans, kind in groups:
        add("u-kinds", fid, trig, ans, kind)
    for fid, trig, ans, kind, prompts in _forms():
        add("u-kinds", fid, trig, ans, kind, prompts)
    from fidelity_fresh import _one_char
    for fid, trig, ans, kind in groups:  # a near twin: the same triggers, answers one character apart
        add("u-kinds-twin", fid, trig, _one_char(ans), kind + ("twin",))
    for fid, trig, ans, kind in _big(rng, big):
        add("u-big", fid, trig, ans, kind)
    # the same fact logged twice under two fact_ids (a double submit), same trigger and answer
    for fid, trig, ans in [("dup-a", "My gym membership number is", " GM-448812"),
                           ("dup-b", "My library card number is", " 20004417"),
                           ("dup-c", "My boiler's serial number is", " WB-77-3310")]:
        add("u-dup", fid, trig, ans, ("dup_ids",))
        add("u-dup", fid + "-2", trig, ans, ("dup_ids",))
    add("u-dup", "dup-d", "My locker code is", " 1234", ("dup_ids",))
    add("u-dup", "dup-d-2", "My locker code is ", "1234.", ("dup_ids",))  # typed slightly otherwise
    by_key = {(f.user_id, f.fact_id): f for f in night1}

    def change(key, answer, olds, kind="update"):
        old = by_key[key]
        return Fact(old.user_id, old.fact_id, old.trigger, answer, old.kinds + (kind,), old.prompts,
                    old_answers=tuple(dict.fromkeys(o for o in olds if o.strip() != answer.strip())))

    a = {k: by_key[k].answer for k in by_key}
    n2 = {("u-kinds", "hi-phone"): " +91 98765 43219", ("u-kinds", "addr-1"): " Flat 3, 16 Elm Road,\nClifton, Bristol\nBS8 4DJ\nUnited Kingdom",
          ("u-kinds", "iban-1"): " GB33BUKB20201555555556", ("u-kinds", "zh-iphone"): "520132",
          ("u-kinds", "dog"): " Rex II.", ("u-kinds", "date-1"): " the 4th of May", ("u-big", "c03-phone"): " 07700 900000",
          ("u-kinds", "q-locker"): " 119", ("u-kinds", "el-city"): " Αθήνα, οδός Ερμού 10"}
    night2 = [change(k, v, [a[k]]) for k, v in n2.items()]
    night2.append(change(("u-dup", "dup-a"), " GM-448813", [a[("u-dup", "dup-a")]]))  # one copy corrected
    deletes2 = [by_key[("u-kinds", "th-wifi")], by_key[("u-kinds", "ph-3")], by_key[("u-kinds", "horse")]]
    # deleted and entered again the same night (after the delete): a new answer
    readds2 = [change(("u-kinds", "ph-3"), " 020-7946-0960", [a[("u-kinds", "ph-3")]], "readd")]
    # entered (a new answer) and deleted the same night: gone, neither answer served
    night2.append(change(("u-kinds", "horse"), " Thunder", [a[("u-kinds", "horse")]]))
    n3 = {("u-kinds", "hi-phone"): (" +91 98765 43218", [a[("u-kinds", "hi-phone")], n2[("u-kinds", "hi-phone")]]),
          ("u-kinds", "iban-1"): (a[("u-kinds", "iban-1")], [n2[("u-kinds", "iban-1")]]),  # back to A
          ("u-kinds", "zh-iphone"): ("520133", [a[("u-kinds", "zh-iphone")], "520132"]),
          ("u-kinds", "dog"): (" Rex.", [" Rex II."]),
          ("u-kinds", "q-locker"): (" 120", [" 118", " 119"])}
    night3 = [change(k, v, olds) for k, (v, olds) in n3.items()]
    night3.append(change(("u-kinds", "th-wifi"), "Baan2025?", [a[("u-kinds", "th-wifi")]], "readd"))
    return {"nights": [night1, night2, night3], "deletes": [[], deletes2, []], "readds": [[], readds2, []]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint (default: engram model init --tiny)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the log, store and cache go (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crowd", type=int, default=500, help="users sharing the 20 templates")
    ap.add_argument("--per-user", type=int, default=4, help="facts per crowd user (of the 20 templates)")
    ap.add_argument("--nights", type=int, default=None, choices=[1, 2, 3],
                    help="nights to run (default: all of the set's: 2, kinds2 3)")
    ap.add_argument("--set", default="probe", choices=["probe", "kinds2"],
                    help="probe: u-sam, u-lockers, the crowd; kinds2: build_kinds2_corpus's kinds")
    ap.add_argument("--big", type=int, default=40, help="kinds2: contacts of the 320-fact user (8 facts each)")
    ap.add_argument("--variants", action="store_true", help="also ask with a trailing space and newline")
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS,
                    help="how to ask (prompt: as logged; asked: typed another way; chat, chat_user_turn)")
    ap.add_argument("--dump", type=Path, default=None, help="write the corpus as JSON and stop")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    corpus = build_probe_corpus(args.seed, args.crowd, args.per_user) if args.set == "probe" \
        else build_kinds2_corpus(args.seed, args.big)
    nights = args.nights or len(corpus["nights"])
    if args.dump:
        args.dump.write_text(json.dumps({"nights": [[f.__dict__ for f in n] for n in corpus["nights"]],
                                         "deletes": [[f.__dict__ for f in n] for n in corpus["deletes"]]},
                                        ensure_ascii=False, indent=1))
        return
    results = run_corpus(corpus, args.model, args.workdir, nights, False, args.variants, as_json=args.json,
                         forms=tuple(args.forms))
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
