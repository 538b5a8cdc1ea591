"""A seeded Nexmark event generator: persons, auctions and bids.

Follows the generator of the Nexmark specification as implemented by Apache Beam's and
Flink's Nexmark suites (``NexmarkUtils`` / ``GeneratorConfig``): out of every 50 events
1 is a person, 3 are auctions and 46 are bids; events are ``1 / rate`` apart in event
time (10,000 events/s by default, Beam's default rate); sellers and bidders are drawn
from the last 1,000 people (a quarter of them "hot"), bids go to the last 100 auctions
(half of them to a hot one) or slightly ahead; prices are ``round(10 ** (6 * u)) * 100``
cents-like integers; each record carries an ``extra`` padding that brings the average
sizes near the specification's (person 200 bytes, auction 500, bid 100).

Times (``dateTime``, ``expires``) are epoch milliseconds.

    .venv/bin/python bench/nexmark/generator.py --events 1000000 --out /tmp/nexmark
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PERSON_PROPORTION, AUCTION_PROPORTION, BID_PROPORTION = 1, 3, 46
TOTAL_PROPORTION = PERSON_PROPORTION + AUCTION_PROPORTION + BID_PROPORTION
FIRST_PERSON_ID, FIRST_AUCTION_ID, FIRST_CATEGORY_ID = 1000, 1000, 10
NUM_CATEGORIES = 5
NUM_ACTIVE_PEOPLE, PERSON_ID_LEAD = 1000, 10
NUM_IN_FLIGHT_AUCTIONS, AUCTION_ID_LEAD = 100, 10
HOT_AUCTION_RATIO, HOT_SELLER_RATIO, HOT_BIDDER_RATIO = 2, 4, 4
BASE_TIME = 1_767_225_600_000  # 2026-01-01T00:00:00Z, epoch ms
US_STATES = ("AZ", "CA", "ID", "OR", "WA", "WY")
US_CITIES = (
    "Phoenix", "Los Angeles", "San Francisco", "Boise", "Portland",
    "Bend", "Redmond", "Seattle", "Kent", "Cheyenne",
)
FIRST_NAMES = ("Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah",
               "Deiter", "Walter")
LAST_NAMES = ("Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones",
              "Noris")
CHANNELS = ("Google", "Facebook", "Baidu", "Apple")
AVG_PERSON, AVG_AUCTION, AVG_BID = 200, 500, 100
KINDS = ("person", "auction", "bid")


class Generator:
    """The Nexmark event stream: ``(kind, record)`` pairs in event-time order."""

    def __init__(self, events: int, seed: int = 1, rate: int = 10_000) -> None:
        self.events = events
        self.rng = random.Random(seed)
        self.delay_us = 1_000_000 / rate

    def timestamp(self, event_number: int) -> int:
        """Event time (epoch ms) of the ``event_number``-th event."""
        return BASE_TIME + int(event_number * self.delay_us) // 1000

    @staticmethod
    def last_person(event_id: int) -> int:
        """Base-0 id of the last person created at or before ``event_id``."""
        epoch, offset = divmod(event_id, TOTAL_PROPORTION)
        offset = min(offset, PERSON_PROPORTION - 1)
        return epoch * PERSON_PROPORTION + offset

    @staticmethod
    def last_auction(event_id: int) -> int:
        """Base-0 id of the last auction created at or before ``event_id``."""
        epoch, offset = divmod(event_id, TOTAL_PROPORTION)
        if offset < PERSON_PROPORTION:
            epoch -= 1
            offset = AUCTION_PROPORTION - 1
        elif offset >= PERSON_PROPORTION + AUCTION_PROPORTION:
            offset = AUCTION_PROPORTION - 1
        else:
            offset -= PERSON_PROPORTION
        return epoch * AUCTION_PROPORTION + offset

    def next_person(self, event_id: int) -> int:
        """A recent person (or one a little ahead), base 0."""
        people = self.last_person(event_id) + 1
        active = min(people, NUM_ACTIVE_PEOPLE)
        return people - active + self.rng.randrange(active + PERSON_ID_LEAD)

    def next_auction(self, event_id: int) -> int:
        """An auction in flight (or one a little ahead), base 0."""
        last = self.last_auction(event_id)
        low = max(last - NUM_IN_FLIGHT_AUCTIONS, 0)
        return low + self.rng.randrange(last - low + 1 + AUCTION_ID_LEAD)

    def price(self) -> int:
        return round(10.0 ** (self.rng.random() * 6.0) * 100.0)

    def extra(self, size: int, average: int) -> str:
        """Padding bringing a record of ``size`` bytes to ``average`` +- 20% (Beam's)."""
        want = average - size
        if want <= 0:
            return ""
        delta = round(want * 0.2)
        n = want - delta + self.rng.randrange(2 * delta + 1)
        return self.string(n)

    def string(self, n: int) -> str:
        return "".join(self.rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))

    def person(self, event_id: int, t: int) -> dict[str, Any]:
        rng = self.rng
        pid = self.last_person(event_id) + FIRST_PERSON_ID
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        email = f"{self.string(7).replace(' ', 'x')}@{self.string(5).replace(' ', 'x')}.com"
        card = " ".join(f"{rng.randrange(10_000):04d}" for _ in range(4))
        rec = {
            "id": pid, "name": name, "emailAddress": email, "creditCard": card,
            "city": rng.choice(US_CITIES), "state": rng.choice(US_STATES), "dateTime": t,
        }
        rec["extra"] = self.extra(len(name) + len(email) + len(card) + 60, AVG_PERSON)
        return rec

    def auction(self, event_id: int, t: int) -> dict[str, Any]:
        rng = self.rng
        aid = self.last_auction(event_id) + FIRST_AUCTION_ID
        if rng.randrange(HOT_SELLER_RATIO) > 0:
            seller = (self.last_person(event_id) // HOT_SELLER_RATIO) * HOT_SELLER_RATIO
        else:
            seller = self.next_person(event_id)
        initial = self.price()
        # An auction runs until about twice the time the next 100 auctions take to start.
        horizon_events = NUM_IN_FLIGHT_AUCTIONS * TOTAL_PROPORTION // AUCTION_PROPORTION
        horizon = self.timestamp(event_id + horizon_events) - t
        item, description = self.string(20), self.string(100)
        rec = {
            "id": aid, "itemName": item, "description": description, "initialBid": initial,
            "reserve": initial + self.price(), "dateTime": t,
            "expires": t + 1 + rng.randrange(max(horizon * 2, 1)),
            "seller": seller + FIRST_PERSON_ID,
            "category": FIRST_CATEGORY_ID + rng.randrange(NUM_CATEGORIES),
        }
        rec["extra"] = self.extra(len(item) + len(description) + 120, AVG_AUCTION)
        return rec

    def bid(self, event_id: int, t: int) -> dict[str, Any]:
        rng = self.rng
        if rng.randrange(HOT_AUCTION_RATIO) > 0:
            auction = (self.last_auction(event_id) // HOT_AUCTION_RATIO) * HOT_AUCTION_RATIO
        else:
            auction = self.next_auction(event_id)
        if rng.randrange(HOT_BIDDER_RATIO) > 0:
            bidder = (self.last_person(event_id) // HOT_BIDDER_RATIO) * HOT_BIDDER_RATIO + 1
        else:
            bidder = self.next_person(event_id)
        channel = rng.choice(CHANNELS)
        url = f"https://www.nexmark.com/{self.string(5).replace(' ', '_')}/item.htm?query=1"
        rec = {
            "auction": auction + FIRST_AUCTION_ID, "bidder": bidder + FIRST_PERSON_ID,
            "price": self.price(), "channel": channel, "url": url, "dateTime": t,
        }
        rec["extra"] = self.extra(len(url) + 70, AVG_BID)
        return rec

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for event_id in range(self.events):
            t = self.timestamp(event_id)
            offset = event_id % TOTAL_PROPORTION
            if offset < PERSON_PROPORTION:
                yield "person", self.person(event_id, t)
            elif offset < PERSON_PROPORTION + AUCTION_PROPORTION:
                yield "auction", self.auction(event_id, t)
            else:
                yield "bid", self.bid(event_id, t)


def write(out: Path, events: int, seed: int = 1, rate: int = 10_000) -> dict[str, int]:
    """Write ``persons.jsonl``, ``auctions.jsonl`` and ``bids.jsonl`` under ``out``."""
    import orjson

    out.mkdir(parents=True, exist_ok=True)
    files = {k: (out / f"{k}s.jsonl").open("wb") for k in KINDS}
    counts = dict.fromkeys(KINDS, 0)
    try:
        for kind, rec in Generator(events, seed, rate):
            files[kind].write(orjson.dumps(rec) + b"\n")
            counts[kind] += 1
    finally:
        for f in files.values():
            f.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=int, default=10_000, help="events per second")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(write(args.out, args.events, args.seed, args.rate))


if __name__ == "__main__":
    main()
