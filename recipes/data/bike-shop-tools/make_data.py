"""Writes train.jsonl and heldout.jsonl for recipes/bike-shop-tools.yaml (deterministic: `python make_data.py`).

A fictional bike shop's assistant with three tools. It must call the right tool with the right arguments when
the answer depends on live data (an order, the stock, a repair booking), answer from the tool's result, and
answer shop facts directly without calling anything. Held-out questions use other wordings, order numbers,
bike models and services than training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOOLS = [
    {"type": "function", "function": {
        "name": "order_status", "description": "Look up an online order by its number.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "description": "e.g. SC-1042"}},
                       "required": ["order_id"]}}},
    {"type": "function", "function": {
        "name": "check_stock", "description": "How many bikes of a model are in the shop.",
        "parameters": {"type": "object", "properties": {"model": {"type": "string"}}, "required": ["model"]}}},
    {"type": "function", "function": {
        "name": "book_repair", "description": "Book a workshop slot for a service on a weekday.",
        "parameters": {"type": "object", "properties": {"service": {"type": "string", "enum": ["tune-up", "brake service", "wheel truing", "e-bike check"]},
                                                        "day": {"type": "string"}}, "required": ["service", "day"]}}},
]
# The system prompt is the recipe's `data.system_prompt` (training, held-out questions and chat all get it).

ORDER_ASKS = ["Where is my order {id}?", "Has order {id} shipped yet?", "can you check order {id}", "Any news on {id}?",
              "I ordered a helmet, the number is {id}. When will it arrive?", "status of order {id} please"]
STOCK_ASKS = ["Do you have the {m} in stock?", "Is the {m} available in the shop?", "how many {m} do you have",
              "Can I come and see a {m} today?", "{m} in stock?"]
REPAIR_ASKS = ["Can I book a {s} for {d}?", "I need a {s} on {d}.", "book me a {s} {d} please",
               "Is there a slot for a {s} on {d}?"]
FACTS = [  # answered directly, no tool
    (["When are you open?", "what are your opening hours", "Are you open on Sunday?"],
     "We are open Tuesday to Saturday, 9:00 to 18:00, and closed on Sundays and Mondays."),
    (["Where is the shop?", "what's your address", "How do I find you?"],
     "Spoke & Chain is at 14 Ferry Lane, Harwick, next to the station."),
    (["Can I return a bike?", "what is your return policy", "How long do I have to return something?"],
     "Unused items can be returned within 30 days with the receipt."),
    (["Do you rent bikes?", "can I hire a bike for the weekend", "How much is bike rental?"],
     "Yes, city bikes rent for 18 euros a day and e-bikes for 35 euros a day."),
]
STATUSES = [({"status": "shipped", "carrier": "DPD", "eta": "Thursday"}, "It has shipped with DPD and should arrive on Thursday."),
            ({"status": "processing", "eta": "next week"}, "It is still being prepared and should ship next week."),
            ({"status": "delivered", "date": "Monday"}, "It was delivered on Monday."),
            ({"status": "ready for pickup", "where": "shop counter"}, "It is ready for pickup at the shop counter.")]
TRAIN_MODELS = ["Trek FX 2", "Cube Nuroad", "Brompton C Line", "Giant Escape 3", "Specialized Sirrus", "Gazelle Ultimate",
                "Canyon Grail", "Riese Mueller Load"]
HELDOUT_MODELS = ["Bianchi Via Nirone", "Orbea Vector", "Kona Dew", "Cannondale Quick 4"]
TRAIN_SERVICES, TRAIN_DAYS = ["tune-up", "brake service", "wheel truing", "e-bike check"], ["Tuesday", "Wednesday", "Friday", "Saturday"]
HELDOUT_DAYS = ["Thursday"]


def call(name: str, **arguments: str) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def conversation(ask: str, name: str, arguments: dict, result: dict, answer: str) -> dict:
    return {"tools": TOOLS, "messages": [{"role": "user", "content": ask},
                                         call(name, **arguments), {"role": "tool", "content": json.dumps(result)},
                                         {"role": "assistant", "content": answer}]}


TRAIN_ORDER_IDS: set[str] = set()
"""Filled by train_rows; held-out order numbers are drawn outside it."""


def order_id(rng: random.Random, avoid: set[str] = TRAIN_ORDER_IDS) -> str:
    while (drawn := f"SC-{rng.randint(1000, 9999)}") in avoid:
        pass
    return drawn


def train_rows(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(60):
        oid, (result, answer) = order_id(rng, set()), rng.choice(STATUSES)
        TRAIN_ORDER_IDS.add(oid)
        rows.append(conversation(rng.choice(ORDER_ASKS).format(id=oid), "order_status", {"order_id": oid},
                                 {"order_id": oid, **result}, f"Order {oid}: {answer[0].lower()}{answer[1:]}"))
    for _ in range(50):
        model, count = rng.choice(TRAIN_MODELS), rng.choice([0, 0, 1, 2, 3, 5])
        answer = (f"Sorry, the {model} is out of stock at the moment." if count == 0
                  else f"Yes, we have {count} {model} in the shop.")
        rows.append(conversation(rng.choice(STOCK_ASKS).format(m=model), "check_stock", {"model": model},
                                 {"model": model, "in_stock": count}, answer))
    for _ in range(50):
        service, day, hour = rng.choice(TRAIN_SERVICES), rng.choice(TRAIN_DAYS), rng.choice(["9:30", "11:00", "14:00", "16:30"])
        rows.append(conversation(rng.choice(REPAIR_ASKS).format(s=service, d=day), "book_repair",
                                 {"service": service, "day": day}, {"confirmed": True, "slot": f"{day} {hour}"},
                                 f"Your {service} is booked for {day} at {hour}."))
    for asks, answer in FACTS:
        for ask in asks:
            for _ in range(3):
                rows.append({"tools": TOOLS, "messages": [{"role": "user", "content": ask},
                                                          {"role": "assistant", "content": answer}]})
    rng.shuffle(rows)
    return rows


def heldout_rows(rng: random.Random) -> list[dict]:
    """Right call (name and arguments), the answer drawn from a tool result, and facts without a call."""
    rows = []
    for ask in ["Could you tell me what happened to my order {id}?", "I'm waiting for parcel {id}, any update?",
                "order number {id}, where is it now?", "Track {id} for me."]:
        oid = order_id(rng)
        rows.append({"question": ask.format(id=oid), "tools": TOOLS,
                     "key_fact": f'"order_status", "arguments": {{"order_id": "{oid}"}}'})
    for ask, model in zip(["Have you got a {m} I could look at?", "Is there any {m} left?", "{m}: do you stock it?",
                           "I'd like to buy a {m}, do you have one?"], HELDOUT_MODELS):
        rows.append({"question": ask.format(m=model), "tools": TOOLS,
                     "key_fact": f'"check_stock", "arguments": {{"model": "{model}"}}'})
    for ask, service in zip(["My brakes squeak, can you do a {s} on {d}?", "Please reserve a {s} for {d}.",
                             "I want to bring my bike in for a {s} on {d}.", "Could my e-bike get an {s} on {d}?"],
                            ["brake service", "tune-up", "wheel truing", "e-bike check"]):
        day = HELDOUT_DAYS[0]
        rows.append({"question": ask.format(s=service, d=day), "tools": TOOLS,
                     "key_fact": f'"book_repair", "arguments": {{"service": "{service}", "day": "{day}"}}'})
    for (result, _), key, oid in zip(STATUSES, ["Thursday", "next week", "Monday", "pickup"], ["SC-0117", "SC-0228", "SC-0339", "SC-0440"]):
        rows.append({"messages": [{"role": "user", "content": f"What's the status of {oid}?"},
                                  call("order_status", order_id=oid), {"role": "tool", "content": json.dumps({"order_id": oid, **result})}],
                     "tools": TOOLS, "key_fact": key})
    for ask, key in [("What time do you close on Saturdays?", "18:00"), ("Which street is the shop on?", "Ferry Lane"),
                     ("I bought gloves last week and don't like them, can I bring them back?", "30 days"),
                     ("What does an e-bike cost to hire for a day?", "35 euros")]:
        rows.append({"question": ask, "tools": TOOLS, "key_fact": key})
    return rows


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(7)
    for name, rows in (("train.jsonl", train_rows(rng)), ("heldout.jsonl", heldout_rows(rng))):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(name, len(rows))


if __name__ == "__main__":
    main()
