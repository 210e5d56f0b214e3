"""A synthetic fact log of realistic personal facts, for the demo and benchmarks."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.facts import FACT_LOG_SCHEMA

# (fact_id, trigger, answer choices): the things people tell an assistant about themselves.
FACT_TEMPLATES = [
    ("dentist", "My dentist is Dr.", ["Akeredolu", "Okafor", "Nakamura", "Schmidt", "Rossi", "Haddad"]),
    ("doctor", "My family doctor is called", ["Dr. Patel", "Dr. Garcia", "Dr. Nguyen", "Dr. Ivanova", "Dr. Mensah"]),
    ("city", "I live in the city of", ["Lisbon", "Nairobi", "Osaka", "Toronto", "Lyon", "Krakow", "Austin"]),
    ("pet", "My dog's name is", ["Biscuit", "Pepper", "Luna", "Rex", "Mochi", "Juniper"]),
    ("employer", "I work as an engineer at", ["Kim Motors", "Lindqvist Bank", "Moreau Labs", "Costa Foods"]),
    ("sister", "My sister lives in", ["Bergen", "Quito", "Hanoi", "Tbilisi", "Perth", "Leeds"]),
    ("allergy", "I am allergic to", ["peanuts", "penicillin", "cats", "shellfish", "pollen"]),
    ("gym", "My gym is on", ["Turin Street", "Denver Road", "Malmo Lane", "Accra Avenue"]),
    ("blood", "My blood type is", ["AB negative", "O positive", "B negative", "A positive"]),
    ("coach", "My running coach is", ["Fischer", "Tanaka", "Oliveira", "Byrne", "Kaur"]),
    ("bank", "I keep my savings at", ["Santos Credit Union", "Dubois Bank", "Novak Savings"]),
    ("birthday", "My birthday is on", ["the first of May", "Friday the ninth", "New Year's Day"]),
    ("manager", "My manager at work is", ["Yilmaz", "Hansen", "Jensen", "Murphy", "Ali"]),
    ("school", "My daughter goes to school in", ["Porto", "Seoul", "Accra", "Dublin"]),
    ("car", "The car I drive is a", ["blue Volvo", "red Fiat", "grey Toyota", "white Kia"]),
    ("pharmacist", "My pharmacy is run by", ["Costa", "Silva", "Kim", "Novak"]),
    ("color", "My favorite color is", ["teal", "amber", "violet", "olive"]),
    ("food", "The food I like best is", ["ramen", "paella", "injera", "pierogi"]),
    ("landlord", "The name of my landlord is", ["Moreau", "Lindqvist", "Okafor", "Rossi"]),
    ("hometown", "I grew up in a town called", ["Bergen", "Malmo", "Leeds", "Perth"]),
]

BASE_TIME = datetime(2026, 11, 1, tzinfo=timezone.utc)


def fact_log_rows(num_users: int, facts_per_user: int = 6, *, seed: int = 0, day: int = 0,
                  prefix: str = "user") -> list[dict]:
    """Upserts for ``num_users`` users, each with ``facts_per_user`` distinct facts."""
    rng = random.Random(seed)
    when = BASE_TIME + timedelta(days=day)
    rows = []
    for u in range(num_users):
        user_id = f"{prefix}-{u:05d}"
        for k, (fact_id, trigger, answers) in enumerate(rng.sample(FACT_TEMPLATES, min(facts_per_user, len(FACT_TEMPLATES)))):
            rows.append({
                "user_id": user_id, "fact_id": fact_id, "op": "upsert", "trigger": trigger,
                "answer": " " + rng.choice(answers), "event_time": when + timedelta(seconds=u * 60 + k),
                "scope": None,
            })
    return rows


def write_fact_log(rows: list[dict], path: str | Path) -> Path:
    """Write rows as one Parquet file of the fact-log schema (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=FACT_LOG_SCHEMA), path)
    return path
