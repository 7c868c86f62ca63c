"""The README's playground screenshot, taken from a real server:

    python scripts/playground_screenshot.py notebooks/results/playground.png run_dir=outputs/run_pipeline/quick_cpu

Starts ``scripts/serve.py`` with the given overrides on a free loopback port, opens the page in
headless Chromium (``loralab.serving.playground_browser``), sends one prompt to compare (``auto``,
``moe`` and ``--extra``) greedily, waits for the answers, selects the ``moe`` token with the most
mixed gate and saves a PNG of the page down to the token's details. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from loralab.serving.bench import ServeProcess
from loralab.serving.playground_browser import chromium_context

PROMPT = "Is a verbal agreement to rent an apartment for three years enforceable?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("overrides", nargs="*", help="scripts/serve.py overrides (run_dir=...)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--extra", default="base", help="a third model next to auto and moe")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    with (
        tempfile.TemporaryDirectory() as tmp,
        ServeProcess(args.overrides, Path(tmp)) as server,
        chromium_context(Path(tmp) / "profile", width=1280, height=800) as browser,
    ):
        tab = browser.new_page()
        tab.goto(server.url)
        tab.wait_for_selector("#models tr[data-model=moe]")
        tab.select_option("#mode", "compare")
        tab.select_option("#extra", args.extra)
        tab.fill("#max-tokens", str(args.max_tokens))
        tab.fill("#temperature", "0")
        tab.fill("#prompt", args.prompt)
        tab.press("#prompt", "Enter")
        tab.wait_for_selector("#answers[data-state=idle]", timeout=600_000)
        index = tab.locator(".panel[data-model=moe] .tok").evaluate_all(
            """spans => { let best = 0, low = 2;
                 spans.forEach((s, i) => { const w = Number(s.dataset.weight);
                   if (s.textContent.trim() && w < low) [best, low] = [i, w]; });
                 return best; }"""
        )  # the most mixed token: the smallest dominant weight
        tab.locator(".panel[data-model=moe] .tok").nth(index).hover()
        bottom = tab.locator("#token-detail").bounding_box()
        height = int(bottom["y"] + bottom["height"] + 16)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tab.screenshot(
            path=str(args.out),
            full_page=True,
            clip={"x": 0, "y": 0, "width": 1280, "height": height},
        )
        panels = tab.locator(".panel").evaluate_all(
            """ps => ps.map(p => ({model: p.dataset.model,
                  state: p.dataset.state,
                  stats: p.querySelector('.stats').textContent,
                  route: p.querySelector('.route').textContent}))"""
        )
    print(json.dumps({"out": str(args.out), "bytes": args.out.stat().st_size, "panels": panels}))


if __name__ == "__main__":
    main()
