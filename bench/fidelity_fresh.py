"""Fidelity on a fresh corpus: whole-answer recall of users and facts of kinds the realistic corpus
(tests/fixtures/realistic_profiles.py, bench/fidelity.py) does not hold, run through the product
the way a user runs it: `engram run nightly` on a local store (two nights: the second corrects,
re-enters and deletes facts), then every live fact asked the way `engram ask` asks it
(engram_core.serving.generate: canonical prompt, greedy decoding, the user's served deltas from
a PullClient) and as `engram serve` renders a chat whose assistant turn is pre-filled with the
trigger (serving.chat.ChatTemplate with the checkpoint's template, after the server's canonical
forms).

Kinds (a fact may have several): accented (Spanish, German, French), cjk (Chinese, Japanese,
Korean), cyrillic, rtl (Arabic, Hebrew), emoji, punct (quotes, parentheses, slashes, URLs,
emails), phone (+1 (555) 010-2030 and other formats), date (ISO, US, European, spelled out),
money (currency symbols, thousands separators), multi_sentence, leading_symbol (answers that
start with a digit or a symbol), near_dup (answers that differ from another of the user's only
in case or one character), question (triggers in question form), long_trigger (40+ words),
ws_trigger (triggers logged and typed with trailing whitespace or newlines), many (a user with
60+ facts), twin (a user whose facts nearly repeat another user's, with other answers), update
(a fact changed on night 2: the new answer must come back, the old one never).

A fact counts as recalled when the generated text, read in canonical form without its leading
spaces, starts with the answer as the user wrote it (canonical text, stripped). The generation
length is the answer's token count plus 2 (`--ask-default` also asks with `engram ask`'s
default of 64 new tokens). A leak is a generated text that starts with another user's answer
to the same trigger (and not with the asker's own), or, for the base model (no memory), with
any user's answer. A run-on is a recalled answer ending in a letter or digit that the generation
continues with another ("7" served as "75"; counted, not a miss). Stale: after night 2, a changed or deleted fact's old answer served.

    python bench/fidelity_fresh.py --json                     # build the tiny model, two nights
    python bench/fidelity_fresh.py --model DIR --workdir /tmp/fresh --json
    python bench/fidelity_fresh.py --dump corpus.json         # just write the corpus

No asserts: results go to bench/RESULTS.md by hand, with date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("accented", "cjk", "cyrillic", "rtl", "emoji", "punct", "phone", "date", "money", "multi_sentence",
         "long_answer", "leading_symbol", "near_dup", "question", "long_trigger", "ws_trigger", "many", "twin",
         "update")


@dataclass
class Fact:
    user_id: str
    fact_id: str
    trigger: str  # as logged (raw)
    answer: str  # as logged (raw)
    kinds: tuple[str, ...]
    prompts: tuple[str, ...] = ()  # what a user types; default: the trigger as logged
    old_answers: tuple[str, ...] = field(default=())  # answers of earlier nights (never to be served)
    old_triggers: tuple[str, ...] = field(default=())  # the fact's earlier triggers (must not serve an old answer)


# ----------------------------------------------------------------------------------------------
# The corpus


def _facts_es():
    return [
        ("nombre", "Me llamo", " María José Núñez Peña", ("accented",)),
        ("ciudad", "Vivo en la ciudad de", " Cádiz, Andalucía", ("accented",)),
        ("medico", "Mi médico de cabecera es", " el Dr. Íñigo Ibáñez", ("accented",)),
        ("cumple", "¿Cuándo es mi cumpleaños?", " El 3 de diciembre de 1987", ("accented", "question", "date")),
        ("alquiler", "Pago de alquiler cada mes:", " 1.250,00 €", ("accented", "money", "leading_symbol")),
        ("telefono", "Mi número de teléfono es el", " +34 612 34 56 78", ("accented", "phone")),
        ("perro", "Mi perro se llama", " Pipí 🐶", ("accented", "emoji")),
        ("receta", "La receta de mi abuela lleva", " azúcar, canela y limón. ¡Nada más!", ("accented", "multi_sentence")),
        ("correo", "Mi correo del trabajo es", " m.nunez@correo-empresa.es", ("accented", "punct")),
        ("pin", "El código de mi taquilla es", " 0452", ("accented", "leading_symbol")),
        ("pin2", "El código de mi bicicleta es", " 0453", ("accented", "near_dup", "leading_symbol")),
        ("frase", "Mi frase favorita es", " «Caminante, no hay camino, se hace camino al andar»",
         ("accented", "punct")),
    ]


def _facts_de():
    return [
        ("name", "Mein Name ist", " Jürgen Weiß-Müller", ("accented",)),
        ("strasse", "Ich wohne in der", " Königstraße 17a, 70173 Stuttgart", ("accented",)),
        ("arzt", "Meine Hausärztin heißt", " Dr. Käthe Größl", ("accented",)),
        ("geburtstag", "Mein Geburtstag ist am", " 04.03.1979", ("accented", "date", "leading_symbol")),
        ("gehalt", "Mein Bruttogehalt beträgt", " 4.875,50 € im Monat", ("accented", "money")),
        ("telefon", "Meine Handynummer lautet", " 0171 / 234 56 78", ("accented", "phone", "leading_symbol")),
        ("allergie", "Wogegen bin ich allergisch?", " Gegen Nüsse und Äpfel. Außerdem gegen Pollen.",
         ("accented", "question", "multi_sentence")),
        ("auto", "Mein Auto ist ein", " VW Käfer (Baujahr 1972)", ("accented", "punct")),
        ("iban", "Meine IBAN ist", " DE89 3704 0044 0532 0130 00", ("accented",)),
        ("zitat", "Mein Lieblingszitat:", " „Die Grenzen meiner Sprache bedeuten die Grenzen meiner Welt.“",
         ("accented", "punct")),
        ("wlan", "Mein WLAN-Passwort ist", " Schöne-Grüße-2024", ("accented", "near_dup")),
        ("wlan-gast", "Das Gast-WLAN-Passwort ist", " schöne-grüße-2024", ("accented", "near_dup")),
    ]


def _facts_fr():
    return [
        ("nom", "Je m'appelle", " Hélène Lefèvre-Côté", ("accented",)),
        ("ville", "J'habite à", " Besançon, près de la Citadelle", ("accented",)),
        ("medecin", "Mon médecin traitant est", " le Dr François Bœuf", ("accented",)),
        ("naissance", "Je suis née le", " 14 juillet 1989", ("accented", "date")),
        ("loyer", "Mon loyer est de", " 1 250,00 € par mois, charges comprises", ("accented", "money")),
        ("tel", "Mon numéro de portable est le", " 06 12 34 56 78", ("accented", "phone", "leading_symbol")),
        ("chat", "Comment s'appelle mon chat ?", " Il s'appelle Gâteau. C'est un chat très câlin.",
         ("accented", "question", "multi_sentence")),
        ("site", "Mon site web est", " https://helene-lefevre.fr/à-propos", ("accented", "punct")),
        ("velo", "Le cadenas de mon vélo s'ouvre avec", " 7-3-1-9", ("accented", "leading_symbol")),
        ("plat", "Mon plat préféré est", " la crème brûlée 🍮", ("accented", "emoji")),
        ("voisin", "Mon voisin s'appelle", " M. Noël Çelik", ("accented",)),
    ]


def _facts_zh():
    return [
        ("name", "我的名字是", "王小明", ("cjk",)),
        ("city", "我住在", "上海市浦东新区世纪大道100号", ("cjk", "leading_symbol")),
        ("doctor", "我的医生是", "李医生（北京协和医院）", ("cjk", "punct")),
        ("birthday", "我的生日是", "1990年5月21日", ("cjk", "date", "leading_symbol")),
        ("salary", "我的月薪是", "¥18,500元", ("cjk", "money", "leading_symbol")),
        ("phone", "我的手机号码是", "138-0013-8000", ("cjk", "phone", "leading_symbol")),
        ("pet", "我的猫叫什么名字？", "它叫咪咪。它是一只橘猫。", ("cjk", "question", "multi_sentence")),
        ("food", "我最喜欢的菜是", "麻婆豆腐🌶️", ("cjk", "emoji")),
        ("ja-name", "私の名前は", "田中花子です", ("cjk",)),
        ("ja-station", "最寄り駅は", "渋谷駅（東京メトロ）です。", ("cjk", "punct")),
        ("ko-name", "제 이름은", " 김민준입니다", ("cjk",)),
        ("ko-city", "저는 서울시", " 강남구 테헤란로 152에 살아요", ("cjk",)),
    ]


def _facts_ru():
    return [
        ("name", "Меня зовут", " Пётр Ильич Соколов", ("cyrillic",)),
        ("city", "Я живу в городе", " Санкт-Петербург, ул. Гороховая, д. 12, кв. 5", ("cyrillic", "punct")),
        ("doctor", "Мой врач —", " Анна Сергеевна Ёлкина", ("cyrillic",)),
        ("birthday", "Мой день рождения", " 12.04.1985", ("cyrillic", "date", "leading_symbol")),
        ("rent", "Моя квартплата составляет", " 35 000 ₽ в месяц", ("cyrillic", "money", "leading_symbol")),
        ("phone", "Мой телефон:", " +7 (912) 345-67-89", ("cyrillic", "phone", "leading_symbol")),
        ("dog", "Как зовут мою собаку?", " Её зовут Жучка. Она очень добрая.", ("cyrillic", "question", "multi_sentence")),
        ("uk-name", "Мене звати", " Олена Іванівна Шевченко", ("cyrillic",)),
        ("code", "Код от подъезда", " 45К7", ("cyrillic", "leading_symbol")),
        ("code2", "Код от калитки", " 45к7", ("cyrillic", "near_dup", "leading_symbol")),
    ]


def _facts_rtl():
    return [
        ("ar-name", "اسمي", " فاطمة الزهراء", ("rtl",)),
        ("ar-city", "أسكن في", " الدار البيضاء، المغرب", ("rtl",)),
        ("ar-phone", "رقم هاتفي هو", " +212 661-234567", ("rtl", "phone", "leading_symbol")),
        ("ar-doctor", "طبيبي هو", " الدكتور يوسف حداد", ("rtl",)),
        ("ar-q", "ما هو لوني المفضل؟", " الأزرق. وأحب الأخضر أيضاً.", ("rtl", "question", "multi_sentence")),
        ("ar-date", "عيد ميلادي في", " ١٥ مارس ١٩٩٢", ("rtl", "date")),
        ("he-name", "קוראים לי", " נועה כהן", ("rtl",)),
        ("he-city", "אני גר ב", "תל אביב-יפו", ("rtl",)),
        ("he-phone", "מספר הטלפון שלי", " 052-345-6789", ("rtl", "phone", "leading_symbol")),
        ("he-money", "שכר הדירה שלי", " ₪5,400 לחודש", ("rtl", "money", "leading_symbol")),
    ]


def _facts_en_punct():
    return [
        ("phone-us", "My phone number is", " +1 (555) 010-2030", ("phone", "leading_symbol")),
        ("phone-office", "My office line is", " (555) 010-2031 ext. 44", ("phone", "leading_symbol", "near_dup")),
        ("email", "My work email is", " jane.o'neil+news@example-mail.co.uk", ("punct",)),
        ("url", "My portfolio lives at", " https://jane.example.org/work?tab=all&sort=new#top", ("punct",)),
        ("path", "My backups are stored in", " /mnt/nas/backups/2024/jane_laptop/", ("punct", "leading_symbol")),
        ("quote", "My grandfather always said", " \"Measure twice, cut once\" (and he meant it).", ("punct",)),
        ("date-iso", "My passport expires on", " 2031-08-15", ("date", "leading_symbol")),
        ("date-us", "My lease ends on", " 08/15/2027", ("date", "leading_symbol")),
        ("date-long", "My daughter was born on", " Tuesday, March 4th, 2014 at 6:45 a.m.", ("date",)),
        ("money-1", "My monthly mortgage payment is", " $2,345.67", ("money", "leading_symbol")),
        ("money-2", "My savings goal for this year is", " $12,500", ("money", "leading_symbol")),
        ("money-3", "My rent in London was", " £1,650.00 pcm", ("money", "leading_symbol")),
        ("multi", "Tell me about my morning routine:",
         " I wake up at 6:15. Then I run 5 km along the river. After that, coffee (black, no sugar).",
         ("multi_sentence", "punct")),
        ("lines", "My shopping list for Saturday:\n", "- oat milk\n- 12 eggs\n- sourdough bread",
         ("multi_sentence", "ws_trigger", "leading_symbol")),
        ("num-first", "How many stairs lead up to my flat?", " 147 steps, five floors.",
         ("question", "leading_symbol")),
        ("hash", "My gym locker is", " #42B", ("leading_symbol",)),
        ("case-1", "My Wi-Fi password is", " BlueHarbor77", ("near_dup",)),
        ("case-2", "My router admin password is", " blueharbor77", ("near_dup",)),
        ("case-3", "My guest Wi-Fi password is", " BlueHarbor78", ("near_dup",)),
        ("emoji-1", "My status message is", " 🌊🏄‍♀️ surf's up!", ("emoji", "leading_symbol")),
        ("emoji-2", "My favourite flag emoji is", " 🏳️‍🌈", ("emoji", "leading_symbol")),
        ("ws-1", "My locker combination is   ", "19-04-33", ("ws_trigger", "leading_symbol")),
        ("ws-2", "My blood pressure target is\t\n", "120/80 mmHg", ("ws_trigger", "leading_symbol")),
        ("long-1",
         "When my sister and I were kids we used to spend every summer at our grandparents' farm near the lake, "
         "and there was one old horse that we rode every single morning before breakfast, and that horse was called",
         " Thunderbolt", ("long_trigger",)),
        ("long-2",
         "The name of the small Italian restaurant on the corner of the street where my husband proposed to me "
         "on a rainy evening in late October, after we had both missed the last train home and had nowhere else "
         "to go, was",
         " Trattoria da Enzo", ("long_trigger",)),
    ]


def _facts_mixed():
    """A user whose facts mix the remaining forms: long answers (90-128 tokens), tabs, a trigger with
    a line break inside, triggers ending in an emoji, a closing quote or a bracket, Thai, IDN URLs,
    one-character answers, answers logged on a new line, more dates, amounts and leading symbols."""
    return [
        ("long-en", "The instructions for feeding my neighbour's cats are",
         " Two scoops of dry food at 7 a.m., half a pouch (salmon, never chicken) at 6 p.m.; fresh water both times. "
         "Mochi eats on the balcony, Pixel in the kitchen: never together!", ("long_answer", "punct", "multi_sentence")),
        ("long-zh", "我家的地址是", "广东省深圳市南山区科技园南区深南大道9988号华润大厦A座23楼2301室（前台请找张先生）",
         ("long_answer", "cjk", "punct")),
        ("tabs", "My desk layout (tab separated) is", " monitor\tlamp\tplant", ("punct",)),
        ("newline-trigger", "Note to self:\nthe garage door code is", " 8-1-8-4#", ("ws_trigger", "leading_symbol")),
        ("emoji-trigger", "My mood today 😀 is", " great, thanks", ("emoji",)),
        ("quote-trigger", 'My grandmother\'s saying "waste not, want not" came from', " her mother in Cork",
         ("punct",)),
        ("bracket-trigger", "My username (the one for the forum) is", " _quiet.river_", ("punct", "leading_symbol")),
        ("thai", "ชื่อเล่นของฉันคือ", "น้องฟ้า", ("cjk",)),
        ("idn", "My city's website is", " https://münchen.de/rathaus/öffnungszeiten", ("punct", "accented")),
        ("one-char", "My blood group letter is", " B", ("leading_symbol",)),
        ("one-digit", "How many kids do I have?", " 3", ("question", "leading_symbol")),
        ("new-line-answer", "My home address:", "\n221B Baker Street\nLondon NW1 6XE", ("multi_sentence", "punct")),
        ("date-iso-time", "My flight lands at", " 2026-03-04T09:30:00Z", ("date", "leading_symbol")),
        ("date-short", "My next dentist appointment is", " Mar 4, 2026, 10:15", ("date",)),
        ("date-jp", "契約の開始日は", "令和8年3月4日", ("date", "cjk")),
        ("money-neg", "My last statement balance was", " -$45.00", ("money", "leading_symbol")),
        ("money-vnd", "Tiền thuê nhà của tôi là", " 12.500.000 ₫ mỗi tháng", ("money", "accented")),
        ("money-usd", "The car loan left to pay is", " USD 18,950.75", ("money",)),
        ("half", "For pancakes I use", " ½ cup of milk and 1¼ cups of flour", ("leading_symbol",)),
        ("tilde", "My commute takes", " ~35 min (door to door)", ("leading_symbol", "punct")),
        ("bracket-answer", "My draft email subject is", " [DRAFT] Q3 budget / v2", ("leading_symbol", "punct")),
        ("guest-1", "My home Wi-Fi network is called", " Casa-Lima-5G", ("near_dup",)),
        ("guest-2", "My guest Wi-Fi network is called", " casa-lima-5g", ("near_dup",)),
        ("guest-3", "My office Wi-Fi network is called", " Casa-Lima-5GHz", ("near_dup",)),
    ]


def _twin(facts, answer_change):
    """Another user's version of ``facts``: same triggers, answers changed by ``answer_change``."""
    return [(fid, trig, answer_change(ans), kinds + ("twin",)) for fid, trig, ans, kinds in facts]


def _one_char(answer: str) -> str:
    """``answer`` with its last digit moved by one (or its last letter changed)."""
    chars = list(answer)
    for i in range(len(chars) - 1, -1, -1):
        if chars[i].isdigit():
            chars[i] = str((int(chars[i]) + 1) % 10) if chars[i].isascii() else "7"
            return "".join(chars)
    for i in range(len(chars) - 1, -1, -1):
        if chars[i].isalpha():
            chars[i] = "x" if chars[i] != "x" else "y"
            return "".join(chars)
    return answer + "!"


def _many(rng: random.Random):
    """64 facts of one household admin: many templates, accounts, codes, appointments."""
    facts = []
    services = ["electricity", "gas", "water", "internet", "mobile", "car insurance", "home insurance", "pension",
                "gym", "library", "parking permit", "council tax", "dentist plan", "vet plan", "streaming", "bank"]
    for k, service in enumerate(services):
        facts.append((f"acct-{k:02d}", f"My {service} account number is",
                      f" {rng.choice('ABCDEFGHJK')}{rng.randint(10, 99)}-{rng.randint(100000, 999999)}",
                      ("many",)))
        facts.append((f"due-{k:02d}", f"My {service} bill is due on",
                      f" the {rng.randint(1, 28)}{'th'} of each month", ("many", "date")))
        facts.append((f"cost-{k:02d}", f"How much is my {service} bill?",
                      f" ${rng.randint(10, 400)}.{rng.randint(10, 99)} a month", ("many", "money", "question")))
    kids = ["Ada", "Ben", "Cleo", "Dev"]
    for k, kid in enumerate(kids):
        facts.append((f"kid-school-{k}", f"{kid}'s school is", f" {rng.choice(['Hillside', 'Riverside', 'Oakwood'])} "
                      f"Primary, class {rng.randint(1, 6)}{rng.choice('ABC')}", ("many",)))
        facts.append((f"kid-teacher-{k}", f"{kid}'s teacher is", f" {rng.choice(['Mrs', 'Mr', 'Ms'])} "
                      f"{rng.choice(['Patel', 'Okoro', 'Svensson', 'Brennan', 'Moreau'])}", ("many",)))
        facts.append((f"kid-bday-{k}", f"{kid}'s birthday is on", f" {rng.randint(1, 28)}/{rng.randint(1, 12)}/"
                      f"{rng.randint(2012, 2020)}", ("many", "date", "leading_symbol")))
    return facts  # 16 * 3 + 4 * 3 = 60


def build_corpus(seed: int = 0) -> dict:
    """{"nights": [[Fact events...], ...], "users": {user: [fact_id...]}}: night 1 upserts every
    fact; night 2 corrects some answers (same fact_id), re-enters one under a new fact_id (same
    trigger, new answer), and deletes some facts."""
    rng = random.Random(seed)
    users = {
        "u-es-maria": _facts_es(), "u-de-juergen": _facts_de(), "u-fr-helene": _facts_fr(),
        "u-zh-xiaoming": _facts_zh(), "u-ru-petr": _facts_ru(), "u-rtl-fatima": _facts_rtl(),
        "u-en-jane": _facts_en_punct(),
    }
    users["u-en-jane-twin"] = _twin(_facts_en_punct(), _one_char)
    users["u-es-maria-twin"] = _twin(_facts_es(), _one_char)
    users["u-household"] = _many(rng) + _facts_en_punct()[:6]
    users["u-mixed-sam"] = _facts_mixed()
    night1 = []
    for user, facts in users.items():
        for fid, trig, ans, kinds in facts:
            if user == "u-household":
                kinds = tuple(dict.fromkeys(kinds + ("many",)))
            night1.append(Fact(user, fid, trig, ans, kinds))
    # night 2: corrections, a re-entry under a new fact_id, deletes
    night2, deletes = [], []
    changes = {
        ("u-en-jane", "money-1"): " $2,415.67",  # one digit moves
        ("u-en-jane", "date-us"): " 08/15/2028",
        ("u-en-jane", "case-1"): " BlueHarbor77!",  # the old answer is a prefix of the new one
        ("u-es-maria", "ciudad"): " Jerez de la Frontera, Andalucía",
        ("u-de-juergen", "telefon"): " 0171 / 234 56 79",
        ("u-zh-xiaoming", "phone"): "139-0013-8000",
        ("u-ru-petr", "rent"): " 38 500 ₽ в месяц",
        ("u-rtl-fatima", "he-phone"): " 052-345-6780",
        ("u-household", "acct-03"): " Z11-000111",
        ("u-fr-helene", "tel"): " 07 12 34 56 78",
        ("u-mixed-sam", "guest-2"): " casa-lima-guest",
    }
    by_key = {(f.user_id, f.fact_id): f for f in night1}
    for key, answer in changes.items():
        old = by_key[key]
        night2.append(Fact(old.user_id, old.fact_id, old.trigger, answer, old.kinds + ("update",),
                           old_answers=(old.answer,)))
    # re-entered under a new fact_id: the same trigger, a new answer (the later one must win)
    for key, new_id, answer in [(("u-en-jane", "hash"), "hash-new", " #17C"),
                                (("u-de-juergen", "auto"), "auto-neu", " VW Golf (Baujahr 2019)")]:
        old = by_key[key]
        night2.append(Fact(old.user_id, new_id, old.trigger, answer, old.kinds + ("update",),
                           old_answers=(old.answer,)))
    # the same fact_id, its trigger reworded into a question: the old trigger must not serve the old answer
    for key, trigger, answer in [(("u-mixed-sam", "tilde"), "How long is my commute?", " ~40 min (door to door)"),
                                 (("u-ru-petr", "city"), "В каком городе я живу?", " Москва, ул. Арбат, д. 1")]:
        old = by_key[key]
        night2.append(Fact(old.user_id, old.fact_id, trigger, answer, old.kinds + ("update", "question"),
                           old_answers=(old.answer,), old_triggers=(old.trigger,)))
    for key in [("u-en-jane", "money-3"), ("u-fr-helene", "plat"), ("u-ru-petr", "code")]:
        old = by_key[key]
        deletes.append(old)
    return {"nights": [night1, night2], "deletes": [[], deletes]}


def prompts_of(fact: Fact) -> tuple[str, ...]:
    """What a user types for a fact: its trigger as logged; for ws_trigger facts also without the
    trailing whitespace, and everyone's trigger with a trailing space and a trailing newline."""
    base = fact.trigger
    forms = [base, base.rstrip(), base.rstrip() + " ", base.rstrip() + "\n"]
    return tuple(dict.fromkeys(forms))


def live_facts(corpus: dict, night: int) -> dict[tuple, Fact]:
    """The facts live after ``night`` (0-based), keyed by (user, canonical trigger): the latest
    event per fact_id, deletes applied, and of facts with one canonical trigger the latest."""
    from engram_core.text import canonical_fact

    per_id: dict[tuple, Fact] = {}
    order: dict[tuple, int] = {}
    seq = 0
    for n in range(night + 1):
        for f in corpus["nights"][n]:
            per_id[(f.user_id, f.fact_id)] = f
            order[(f.user_id, f.fact_id)] = seq = seq + 1
        for f in corpus["deletes"][n]:
            per_id.pop((f.user_id, f.fact_id), None)
        for f in corpus.get("readds", [[]] * (n + 1))[n]:  # logged after the night's deletes
            per_id[(f.user_id, f.fact_id)] = f
            order[(f.user_id, f.fact_id)] = seq = seq + 1
    live: dict[tuple, Fact] = {}
    for key, f in sorted(per_id.items(), key=lambda kv: order[kv[0]]):
        trig = canonical_fact(f.trigger, f.answer)[0]
        prior = live.get((f.user_id, trig))
        if prior is not None and prior.answer != f.answer:
            f = Fact(f.user_id, f.fact_id, f.trigger, f.answer, f.kinds, f.prompts,
                     tuple(dict.fromkeys(f.old_answers + (prior.answer,))), f.old_triggers)
        live[(f.user_id, trig)] = f
    return live


def fact_log_table(facts: list[Fact], deletes: list[Fact], when: datetime, readds: list[Fact] = ()):
    """One night's log: ``facts`` upserted, then ``deletes``, then ``readds`` upserted (a fact
    deleted and entered again the same night), one second apart."""
    import pyarrow as pa

    rows = []
    for i, f in enumerate(facts):
        rows.append({"user_id": f.user_id, "fact_id": f.fact_id, "op": "upsert", "trigger": f.trigger,
                     "answer": f.answer, "event_time": when + timedelta(seconds=i)})
    for i, f in enumerate(deletes):
        rows.append({"user_id": f.user_id, "fact_id": f.fact_id, "op": "delete", "trigger": None, "answer": None,
                     "event_time": when + timedelta(seconds=len(facts) + i)})
    for i, f in enumerate(readds):
        rows.append({"user_id": f.user_id, "fact_id": f.fact_id, "op": "upsert", "trigger": f.trigger,
                     "answer": f.answer, "event_time": when + timedelta(seconds=len(facts) + len(deletes) + i)})
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("user_id", pa.string()), ("fact_id", pa.string()), ("op", pa.string()), ("trigger", pa.string()),
        ("answer", pa.string()), ("event_time", pa.timestamp("us", tz="UTC"))]))


def _one_edit(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` differ in one character (same length) or in case only."""
    if a.lower() == b.lower():
        return True
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1


# ----------------------------------------------------------------------------------------------
# Running it through the product


def run_night(workdir: Path, model: Path, night: int, as_json: bool) -> dict:
    cmd = [sys.executable, "-m", "jobs.cli", "run", "nightly", "--store", str(workdir / "store"),
           "--fact-log", str(workdir / "log"), "--model", str(model), "--workers", "0", "--num-shards", "4",
           "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise SystemExit(f"night {night + 1} failed (exit {done.returncode}):\n{done.stderr[-4000:]}") from None
    if not report.get("published"):
        raise SystemExit(f"night {night + 1} not published: {report}")
    return report


def _stats(workdir: Path, sql: str) -> list[dict]:
    """Rows of ``engram stats --json SQL`` on the run's store."""
    cmd = [sys.executable, "-m", "jobs.cli", "stats", "--store", str(workdir / "store"), "--json", sql]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    out = json.loads(done.stdout)
    return out.get("rows", out) if isinstance(out, dict) else out


def rejects(workdir: Path) -> list[dict]:
    return _stats(workdir, "select version, user_id, fact_id, reason, detail from rejects")


def statuses(workdir: Path) -> list[dict]:
    return _stats(workdir, "select user_id, fact_id, status, detail from facts where version = "
                           "(select max(version) from facts) and status not in ('ok', 'low_margin')")


def _generate_ids(em, prompt_ids: list[list[int]], deltas: list[list], max_new_tokens: int) -> list[str]:
    """Greedy continuations of token-id prompts with per-sequence deltas (the serving path, for
    prompts a chat template rendered)."""
    from engram_core.serving import generate_ids, overlay_for

    return generate_ids(em, prompt_ids, overlay_for(em, deltas), max_new_tokens)


FORMS = ("prompt", "variant", "asked", "chat", "chat_user_turn")


def evaluate(workdir: Path, model: Path, corpus: dict, night: int, ask_default: bool, variants: bool = True,
             forms: tuple[str, ...] = FORMS) -> dict:
    from engram_core.serving import generate
    from engram_core.text import canonical_fact, canonical_prompt, canonical_text
    from serving.chat import ChatTemplate
    from serving.pull import PullClient
    from serving.pull import resolve_model
    from versions.catalog import read_current
    from versions.store import open_store

    store = open_store(str(workdir / "store"), create=False)
    manifest = read_current(store)[0]
    em = resolve_model(store, manifest, model_dir=model, cache_dir=workdir / "cache")
    client = PullClient(store, em, shards=None, cache_dir=workdir / "cache")
    client.poll()
    chat = ChatTemplate(em.tokenizer)
    live = live_facts(corpus, night)
    answers_by_trigger: dict[str, dict[str, str]] = defaultdict(dict)  # canonical trigger -> user -> answer
    for (user, trig), f in live.items():
        answers_by_trigger[trig][user] = f.answer

    def want(answer: str) -> str:
        return canonical_text(answer).strip()

    def starts(text: str, answer: str) -> bool:
        return canonical_text(text).lstrip(" ").startswith(want(answer))

    cases = []  # (form, fact, prompt, user)
    for (user, trig), f in sorted(live.items()):
        for k, p in enumerate(prompts_of(f)[:None if variants else 1]):
            cases.append(("prompt" if k == 0 else "variant", f, p, user))
        for p in f.prompts:  # the trigger typed another way than it was logged
            cases.append(("asked", f, p, user))
        cases.append(("chat", f, f.trigger, user))
        cases.append(("chat_user_turn", f, f.trigger, user))
    cases = [c for c in cases if c[0] in forms]
    def _after(text: str, answer: str) -> str:  # what follows a recalled answer
        return canonical_text(text).lstrip(" ")[len(want(answer)):]

    per_kind: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    failed, leaks, stale, near_misses, run_on = [], [], [], [], []
    batch = 32
    texts_all = []
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        n = max(len(em.encode_answer(canonical_fact(f.trigger, f.answer)[1])) for _, f, _, _ in chunk) + 2
        plain = [(i, c) for i, c in enumerate(chunk) if not c[0].startswith("chat")]
        chats = [(i, c) for i, c in enumerate(chunk) if c[0].startswith("chat")]
        texts = [None] * len(chunk)
        if plain:
            outs = generate(em, [c[2] for _, c in plain], [list(client.deltas_for(c[3])) for _, c in plain],
                            max_new_tokens=n)
            for (i, _), t in zip(plain, outs):
                texts[i] = t
        if chats:
            ids = []
            for _, c in chats:  # as serving/http.py prepares a chat: canonical text, the continued message a prompt
                if c[0] == "chat":  # the assistant turn pre-filled with the trigger
                    msgs = [{"role": "user", "content": canonical_text("Can you remind me?")},
                            {"role": "assistant", "content": canonical_prompt(c[2]) or c[2]}]
                else:  # the user's message ends with the trigger, continue_final_message: true
                    msgs = [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": canonical_prompt(c[2]) or c[2]}]
                ids.append(chat.render(msgs, continue_final_message=True).prompt_ids)
            outs = _generate_ids(em, ids, [list(client.deltas_for(c[3])) for _, c in chats], n)
            for (i, _), t in zip(chats, outs):
                texts[i] = t
        texts_all += texts
    for (form, f, p, user), text in zip(cases, texts_all):
        hit = starts(text, f.answer)
        for kind in f.kinds + ("all",):
            per_kind[form][kind].append(hit)
        if hit and want(f.answer)[-1:].isalnum() and _after(text, f.answer)[:1].isalnum():
            run_on.append({"form": form, "user": user, "fact": f.fact_id, "want": want(f.answer),
                           "got": text[:len(f.answer) + 12]})  # "7" served as "75"
        if not hit and len(failed) < 80:
            failed.append({"form": form, "user": user, "fact": f.fact_id, "prompt": p, "want": want(f.answer),
                           "got": text[:len(f.answer) + 24], "kinds": f.kinds})
        trig = canonical_fact(f.trigger, f.answer)[0]
        for other, answer in answers_by_trigger[trig].items():
            if other != user and not starts(text, f.answer) and starts(text, answer) and want(answer) != want(f.answer):
                if _one_edit(want(answer), want(f.answer)):  # a one-character miss of the asker's own answer
                    near_misses.append({"form": form, "user": user, "fact": f.fact_id, "got": text[:60]})
                    continue
                leaks.append({"form": form, "user": user, "fact": f.fact_id, "served_answer_of": other, "got": text[:60]})
        for old in f.old_answers:
            if want(old) != want(f.answer) and starts(text, old) and not starts(text, f.answer):
                stale.append({"form": form, "user": user, "fact": f.fact_id, "old": old, "got": text[:60]})
    # a fact's earlier trigger (reworded on a later night) must not serve its old answer
    moved = [(f, t) for f in live.values() for t in f.old_triggers
             if (f.user_id, canonical_prompt(t)) not in live]
    if moved:
        outs = generate(em, [t for _, t in moved], [list(client.deltas_for(f.user_id)) for f, _ in moved],
                        max_new_tokens=48)
        for (f, t), text in zip(moved, outs):
            if any(starts(text, old) for old in f.old_answers):
                stale.append({"form": "old_trigger", "user": f.user_id, "fact": f.fact_id, "got": text[:60]})
    # deleted facts: their old answer must not come back
    deleted = [f for n in range(night + 1) for f in corpus["deletes"][n]]
    if deleted:
        outs = generate(em, [f.trigger for f in deleted], [list(client.deltas_for(f.user_id)) for f in deleted],
                        max_new_tokens=48)
        for f, text in zip(deleted, outs):
            still = [g for g in live.values() if g.user_id == f.user_id
                     and canonical_fact(g.trigger, g.answer)[0] == canonical_fact(f.trigger, f.answer)[0]]
            if not still and starts(text, f.answer):
                stale.append({"form": "deleted", "user": f.user_id, "fact": f.fact_id, "old": f.answer, "got": text[:60]})
    # the base model (a user with no memory) must serve nobody's answer
    base_prompts = sorted({f.trigger for f in live.values()})
    base_leaks = 0
    for start in range(0, len(base_prompts), batch):
        chunk = base_prompts[start:start + batch]
        outs = generate(em, chunk, [[] for _ in chunk], max_new_tokens=24)
        for p, text in zip(chunk, outs):
            trig = canonical_prompt(p)
            base_leaks += any(starts(text, a) for a in answers_by_trigger.get(trig, {}).values() if len(want(a)) > 2)
    out = {"night": night + 1, "live_facts": len(live),
           "recall": {form: {kind: f"{sum(h)}/{len(h)}" for kind, h in sorted(kinds.items())}
                      for form, kinds in per_kind.items()},
           "leaks": leaks, "one_char_misses_like_another_users_answer": near_misses, "stale": stale,
           "stale_checks": sum(len(f.old_answers) > 0 for f in live.values()) + len(moved) + len(deleted),
           "base_model_leaks": base_leaks, "run_on": run_on, "failed": failed}
    if ask_default:  # engram ask's default length
        import inspect

        from jobs import serve_cli

        ask_tokens = inspect.signature(serve_cli.ask).parameters["max_new_tokens"].default.default
        if ask_tokens is None:  # the default since 2026-12-01: every answer the compiler takes
            from engram_core.options import CompileOptions

            ask_tokens = CompileOptions.max_answer_tokens
        prompts = [(f, f.trigger) for f in live.values()]
        cut = 0
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            outs = generate(em, [p for _, p in chunk], [list(client.deltas_for(f.user_id)) for f, _ in chunk],
                            max_new_tokens=ask_tokens)
            cut += sum(not starts(t, f.answer) for (f, _), t in zip(chunk, outs))
        out["ask_default"] = {"max_new_tokens": ask_tokens, "recalled": f"{len(prompts) - cut}/{len(prompts)}"}
    return out


def run_corpus(corpus: dict, model: Path | None, workdir: Path | None, nights: int, ask_default: bool,
               variants: bool = True, as_json: bool = False, forms: tuple[str, ...] = FORMS) -> list[dict]:
    """Each night of ``corpus`` through `engram run nightly` on a local store in ``workdir``, then
    :func:`evaluate`; one result per night (printed as it comes unless ``as_json``)."""
    import pyarrow.parquet as pq

    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    workdir = workdir or Path(tmp.name)
    (workdir / "log").mkdir(parents=True, exist_ok=True)
    if model is None:
        model = workdir / "model"
        if not model.exists():
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            subprocess.run([sys.executable, "-m", "jobs.cli", "model", "init", str(model), "--tiny"], cwd=ROOT,
                           env=env, check=True, capture_output=True)
    results = []
    start = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)
    for night in range(nights):
        pq.write_table(fact_log_table(corpus["nights"][night], corpus["deletes"][night], start + timedelta(days=night),
                                      corpus.get("readds", [[]] * nights)[night]),
                       workdir / "log" / f"night-{night + 1}.parquet")
        report = run_night(workdir, model, night, as_json)
        result = evaluate(workdir, model, corpus, night, ask_default, variants, forms)
        result["rejects"] = [r for r in rejects(workdir) if r.get("version") == report.get("version")] \
            if report.get("version") else []
        result["not_ok"] = statuses(workdir)
        result["compile"] = {k: report.get(k) for k in ("facts_ok", "facts_failed", "version")}
        results.append(result)
        if not as_json:
            print(json.dumps(result, indent=1, ensure_ascii=False))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint (default: engram model init --tiny)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the log, store and cache go (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nights", type=int, default=2, choices=[1, 2])
    ap.add_argument("--ask-default", action="store_true", help="also ask with engram ask's 64 new tokens")
    ap.add_argument("--dump", type=Path, default=None, help="write the corpus as JSON and stop")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    corpus = build_corpus(args.seed)
    if args.dump:
        args.dump.write_text(json.dumps({"nights": [[f.__dict__ for f in n] for n in corpus["nights"]],
                                         "deletes": [[f.__dict__ for f in n] for n in corpus["deletes"]]},
                                        ensure_ascii=False, indent=1))
        return
    results = run_corpus(corpus, args.model, args.workdir, args.nights, args.ask_default, as_json=args.json)
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
