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

"asked" in the table is the trigger typed the other way (``Fact.prompts``); "prompt" the trigger
as logged.

    python bench/fidelity_probe.py --model DIR --workdir /tmp/probe --json
    python bench/fidelity_probe.py --crowd 50 --json          # a smaller crowd
    python bench/fidelity_probe.py --dump corpus.json         # just write the corpus

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint (default: engram model init --tiny)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the log, store and cache go (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crowd", type=int, default=500, help="users sharing the 20 templates")
    ap.add_argument("--per-user", type=int, default=4, help="facts per crowd user (of the 20 templates)")
    ap.add_argument("--nights", type=int, default=2, choices=[1, 2])
    ap.add_argument("--variants", action="store_true", help="also ask with a trailing space and newline")
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS,
                    help="how to ask (prompt: as logged; asked: typed another way; chat, chat_user_turn)")
    ap.add_argument("--dump", type=Path, default=None, help="write the corpus as JSON and stop")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    corpus = build_probe_corpus(args.seed, args.crowd, args.per_user)
    if args.dump:
        args.dump.write_text(json.dumps({"nights": [[f.__dict__ for f in n] for n in corpus["nights"]],
                                         "deletes": [[f.__dict__ for f in n] for n in corpus["deletes"]]},
                                        ensure_ascii=False, indent=1))
        return
    results = run_corpus(corpus, args.model, args.workdir, args.nights, False, args.variants, as_json=args.json,
                         forms=tuple(args.forms))
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
