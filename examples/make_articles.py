"""Generate synthetic news articles for batchify's examples, tests and benchmarks.

    python examples/make_articles.py 60 > examples/articles.jsonl
    python examples/make_articles.py 200000 --words 1900 > big.jsonl   # ~11 KB, ~2,800 tokens each

All companies, people and places are invented for this project; the text is written from topic
templates so that every article reads like news and differs from the others.
"""

from __future__ import annotations

import argparse
import random
import sys

import orjson

COMPANIES = [
    "Norhaven Capital",
    "Quillmark Systems",
    "Brightwater Foods",
    "Tessaline Motors",
    "Orvane Pharma",
    "Kestrel Logistics",
    "Halberd Energy",
    "Lumio Networks",
    "Calder & Finch Bank",
    "Ridgeway Mining",
    "Sablewood Retail",
    "Veritan Insurance",
    "Pellucid Robotics",
    "Marrow Street Media",
    "Ashgrove Airlines",
]
CITIES = ["Port Elwyn", "Castlebury", "New Ardent", "Lowmere", "Saint Corvin", "Brannock", "Vell Harbor"]
PEOPLE = [
    "Mara Okafor",
    "Daniel Weiss",
    "Priya Raman",
    "Tomas Lindqvist",
    "Aiko Tanaka",
    "Grace Mbeki",
    "Luis Ortega",
    "Helena Novak",
    "Samuel Adeyemi",
    "Ines Carvalho",
]

TOPICS = {
    "markets": (
        [
            "{co} shares jump after surprise guidance",
            "Bond yields climb as traders price in another hike",
            "Stocks slide on weak factory data",
            "{co} stock falls after analyst downgrade",
        ],
        [
            "Shares of {co} rose {pct}% in early trading on {day} after the company raised its full-year outlook.",
            "The benchmark index closed {pct}% lower, its worst session in {n} weeks.",
            "Traders said volumes were {adj} than usual as investors waited for the central bank's decision.",
            "Analysts at {co2} said the move reflected {adj2} demand and tighter margins.",
            "The ten-year yield touched {yld}%, a level last seen in the spring.",
            "{person}, a portfolio manager in {city}, said the market was 'pricing in a lot of good news'.",
        ],
    ),
    "companies": (
        [
            "{co} to acquire {co2} in ${bn} billion deal",
            "{co} names {person} chief executive",
            "{co} cuts {n}00 jobs in restructuring",
            "{co} opens new plant in {city}",
        ],
        [
            "{co} said on {day} it had agreed to buy {co2} for about ${bn} billion in cash and stock.",
            "The deal, which still needs regulatory approval, is expected to close next year.",
            "{person} will take over as chief executive on the first of next month, the board said.",
            "The company reported quarterly revenue of ${bn} billion, up {pct}% from a year earlier.",
            "Employees in {city} were told of the changes at a meeting on {day} morning.",
            "A spokesperson for {co2} declined to comment on the talks.",
        ],
    ),
    "economy": (
        [
            "Inflation eases to {pct}% as fuel prices fall",
            "Jobless rate holds steady at {pct}%",
            "Central bank leaves rates unchanged",
            "Retail sales beat forecasts in {city}",
        ],
        [
            "Consumer prices rose {pct}% in the year to last month, down from the month before, official figures showed.",
            "Economists had expected a {adj} reading, citing higher rents and food costs.",
            "The central bank kept its main rate at {yld}% and said it would watch wages closely.",
            "{person}, chief economist at {co}, said households were 'still feeling the squeeze'.",
            "Exports to neighbouring markets grew for a {n}th straight month.",
            "The finance ministry said the figures supported its forecast of modest growth this year.",
        ],
    ),
    "technology": (
        [
            "{co} unveils new AI chip for data centres",
            "{co} app outage hits millions of users",
            "{co} faces scrutiny over data practices",
            "Start-up from {city} raises ${bn}0 million",
        ],
        [
            "{co} said its new processor would cut the energy used to train large models by {pct}%.",
            "The outage began shortly after {n} a.m. and lasted several hours, the company said.",
            "Regulators in {city} have asked the company to explain how it stores customer data.",
            "{person}, the firm's chief technology officer, said the product would ship next quarter.",
            "Engineers traced the problem to a faulty configuration change, according to a status page.",
            "Rivals including {co2} are racing to release similar tools.",
        ],
    ),
    "politics": (
        [
            "Parliament passes budget after marathon session",
            "{person} launches bid for mayor of {city}",
            "Coalition talks stall over housing policy",
            "Minister resigns after expenses row",
        ],
        [
            "Lawmakers approved the spending plan by {n} votes after debating through the night.",
            "{person} told supporters in {city} that housing and transport would be the priorities.",
            "The opposition said the plan did too little for rural areas.",
            "Talks between the parties broke down on {day} over rent controls.",
            "Polls suggest a close race, with {pct}% of voters still undecided.",
            "A government spokesperson said the minister had 'acted in good faith'.",
        ],
    ),
    "science": (
        [
            "Astronomers spot water vapour on distant planet",
            "Researchers map deep-sea coral reef off {city}",
            "New battery chemistry survives {n}000 cycles",
            "Study links sleep to memory in bees",
        ],
        [
            "The team, led by {person}, used a space telescope to study the planet's atmosphere.",
            "The findings were published on {day} in a peer-reviewed journal.",
            "Researchers said the reef stretches for about {n}0 kilometres at depths of up to 800 metres.",
            "The cells kept {pct}% of their capacity after thousands of charge cycles in the lab.",
            "Other scientists cautioned that the results still need to be repeated.",
            "Funding came from a public research council and a foundation based in {city}.",
        ],
    ),
    "health": (
        [
            "Hospital waiting lists fall for first time in years",
            "New vaccine shows promise in early trial",
            "{co} recalls blood-pressure drug batches",
            "Flu cases rise ahead of winter in {city}",
        ],
        [
            "Health officials said waiting lists had fallen by {pct}% since the start of the year.",
            "In a trial of {n}00 volunteers, the vaccine produced a strong immune response with mild side effects.",
            "{co} said it was recalling several batches as a precaution and that no harm had been reported.",
            "Doctors in {city} urged older people to get vaccinated before the holidays.",
            "{person}, who led the study, said larger trials would begin next year.",
            "Pharmacies have been told to check their stock, the regulator said.",
        ],
    ),
    "sports": (
        [
            "{city} United clinch title on final day",
            "{person} wins marathon in record time",
            "Injury blow for national team before qualifier",
            "Club confirms sale to investor group",
        ],
        [
            "{city} United won 2-1 on {day} to finish {n} points clear at the top of the table.",
            "{person} crossed the line in two hours and {n} minutes, breaking the course record.",
            "The coach said the squad would 'regroup and go again' after a difficult week.",
            "A crowd of more than {n}0,000 packed the stadium for the final match.",
            "The club said the new owners would invest in the youth academy.",
            "Tickets for next season went on sale on {day} and sold out within hours.",
        ],
    ),
    "entertainment": (
        [
            "Festival in {city} draws record crowds",
            "{person} film tops weekend box office",
            "Streaming service {co} raises prices",
            "Museum reopens after two-year renovation",
        ],
        [
            "Organisers said more than {n}0,000 people attended over three days.",
            "The film took in ${bn}0 million in its opening weekend, beating expectations.",
            "{co} said monthly prices would rise by {pct}% for new subscribers.",
            "Critics praised the new galleries and the restored glass roof.",
            "{person} thanked fans in a short video posted on {day}.",
            "The festival's director said next year's line-up would be announced in spring.",
        ],
    ),
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def article(i: int, rng: random.Random, words: int) -> dict:
    topic = list(TOPICS)[i % len(TOPICS)]
    titles, sentences = TOPICS[topic]

    def fill(s: str) -> str:
        co, co2 = rng.sample(COMPANIES, 2)
        return s.format(
            co=co,
            co2=co2,
            person=rng.choice(PEOPLE),
            city=rng.choice(CITIES),
            day=rng.choice(DAYS),
            pct=round(rng.uniform(0.3, 9.5), 1),
            n=rng.randint(2, 9),
            bn=rng.randint(1, 40),
            yld=round(rng.uniform(1.5, 5.5), 2),
            adj=rng.choice(["lower", "higher", "thinner"]),
            adj2=rng.choice(["strong", "uneven", "cooling", "resilient"]),
        )

    title = fill(rng.choice(titles))
    paras, count = [], 0
    while count < words:
        para = " ".join(fill(s) for s in rng.sample(sentences, k=rng.randint(2, 4)))
        paras.append(para)
        count += len(para.split())
    slug = "-".join(w.lower().strip(",.$%'") for w in title.split()[:6])
    return {
        "id": f"art-{i:06d}",
        "title": title,
        "url": f"https://news.example.com/{topic}/{i}-{slug}",
        "published": f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}",
        "text": "\n\n".join(paras),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("count", type=int)
    ap.add_argument("--words", type=int, default=180, help="about this many words per article")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    out = sys.stdout.buffer
    for i in range(1, a.count + 1):
        out.write(orjson.dumps(article(i, rng, a.words)) + b"\n")


if __name__ == "__main__":
    main()
