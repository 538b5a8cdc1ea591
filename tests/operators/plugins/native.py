"""A native (Python) plugin for the tests: adds a score, rejects negative amounts."""


def score(record: dict, config: dict) -> dict | list | None:
    assert "_meta" not in record  # as a WASM or remote plugin, it sees none
    if record.get("skip"):
        return None
    if record["amount"] < 0:
        raise ValueError(f"negative amount {record['amount']}")
    if record["amount"] > 100:
        return [record]  # not an object: its record fails
    if record["amount"] == 99:
        raise SystemExit(3)  # as some libraries do: the record fails, not the run
    return {"amount": record["amount"], "score": record["amount"] * config["weight"]}
