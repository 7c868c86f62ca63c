"""Two-domain requests: one record of each of two domains joined into "answer both parts".

Built deterministically from test-split records: for every unordered pair of domains (a, b), the
i-th short test record of a is joined with the i-th of b, alternating which part comes first. The
gold response is both answers in order. This is where token-level mixing can beat picking a single
expert per request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

from loralab.data.records import Record, load_domain_split, spread_subset

PAIR_TEMPLATE = "Answer both parts.\n\nPart 1:\n{first}\n\nPart 2:\n{second}"
RESPONSE_TEMPLATE = "Part 1:\n{first}\n\nPart 2:\n{second}"


def join_pair(a: Record, b: Record) -> Record:
    """The two-domain record for ``a`` then ``b``; its domain reads ``"<a>+<b>"``."""
    return Record(
        id=f"pair:{a.id}+{b.id}",
        domain=f"{a.domain}+{b.domain}",
        instruction=PAIR_TEMPLATE.format(first=a.instruction, second=b.instruction),
        response=RESPONSE_TEMPLATE.format(first=a.response, second=b.response),
        source=f"{a.source} || {b.source}",
        license=f"{a.license} / {b.license}",
    )


def two_domain_records(
    data_cfg: Mapping[str, Any],
    domains: Sequence[str],
    per_pair: int,
    max_chars_per_part: int = 700,
    split: str = "test",
) -> list[Record]:
    """``per_pair`` joined records for every pair of ``domains``, from ``split`` only.

    Parts are test records whose instruction + response fit ``max_chars_per_part`` characters (so a
    pair fits a model's context), picked evenly over each file.
    """
    pool: dict[str, list[Record]] = {}
    for domain in domains:
        short = [
            r
            for r in load_domain_split(data_cfg, domain, split, limit=None)  # type: ignore[arg-type]
            if len(r.instruction) + len(r.response) <= max_chars_per_part
        ]
        if len(short) < per_pair:
            raise ValueError(
                f"two-domain set: only {len(short)} {split} records of {domain!r} fit "
                f"{max_chars_per_part} characters, need {per_pair}"
            )
        pool[domain] = spread_subset(short, per_pair * (len(domains) - 1))
    used = dict.fromkeys(domains, 0)
    out: list[Record] = []
    for a, b in combinations(domains, 2):
        for i in range(per_pair):
            ra, rb = pool[a][used[a]], pool[b][used[b]]
            used[a] += 1
            used[b] += 1
            out.append(join_pair(ra, rb) if i % 2 == 0 else join_pair(rb, ra))
    return out
