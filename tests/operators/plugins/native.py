"""A native (Python) plugin for the tests: adds a score, rejects negative amounts."""


def score(record: dict, config: dict) -> dict | None:
    if record.get("skip"):
        return None
    if record["amount"] < 0:
        raise ValueError(f"negative amount {record['amount']}")
    return {**record, "score": record["amount"] * config["weight"]}
