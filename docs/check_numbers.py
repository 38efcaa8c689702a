"""The figures that README.md and docs/ quote from committed records, checked against those records.

    python docs/check_numbers.py        # one line per quote that no longer matches its record; exit 1 if any

Each check below names a page and returns what that page must contain, computed from the JSON records the page
cites: a text (a table as the script that made the record prints it; line breaks and runs of spaces count as one
space), or a `quote`: the figures, in order, that the paragraph, list item or table row holding a lead phrase
quotes. A rerun that changes a record changes what the page must hold, so the page fails here until it quotes the
new figures. `make test` runs this (tests/test_docs.py).
"""

import json
import re
import statistics
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "benchmarks"))

CHECKS: list[tuple[str, object]] = []  # (page, function of the root returning the texts the page must hold)
READ: set[Path] = set()  # every record a check has read


def check(page: str):
    def register(fn):
        CHECKS.append((page, fn))
        return fn

    return register


@cache
def _json(path: Path):
    READ.add(path)
    return json.loads(path.read_text())


def record(root: Path, path: str):
    return _json(root / path)


def folder(root: Path, path: str) -> Path:
    """A folder of records that a script's table function reads itself: each of its JSON files counts as read."""
    READ.update((root / path).glob("*.json"))
    return root / path


@dataclass(frozen=True)
class Quote:
    """Figures a page quotes in prose: the paragraph, list item or table row holding `lead` holds `figures`, in
    this order, each as a whole number (not inside a longer one)."""

    lead: str
    figures: tuple[str, ...]

    def missing(self, page: str) -> str | None:
        blocks = [normalised(b) for b in re.split(r"\n\s*\n|\n(?=\s*(?:- |\| |\d+\. ))", page)]
        block = next((b for b in blocks if normalised(self.lead) in b), None)
        if block is None:
            return f"no paragraph holds {self.lead!r}"
        at = block.index(normalised(self.lead))
        for figure in self.figures:
            found = re.compile(r"(?<![\d.])" + re.escape(figure) + r"(?![\d]|\.\d)").search(block, at)
            if found is None:
                return f"the paragraph of {self.lead!r} does not quote {figure!r} (after {block[at - 40:at][-40:]!r})"
            at = found.end()
        return None


def quote(lead: str, *figures) -> Quote:
    return Quote(lead, tuple(str(f) for f in figures))


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def mean(values) -> float:
    return statistics.mean(values)


# ---- the checks, page by page ----

# -- README.md --

# -- docs/training.md --

# -- docs/quality.md --

# -- docs/sampling.md --

# -- docs/parity.md --

# -- docs/convert.md --

# -- docs/performance.md and docs/perf/ --


# ---- running them ----


def failures(root: Path = ROOT) -> list[str]:
    """One line per text that its page does not contain (or per check that could not read its records)."""
    lines = []
    pages = {}
    for page, fn in CHECKS:
        if page not in pages:
            pages[page] = (root / page).read_text()
        try:
            texts = fn(root)
        except (OSError, KeyError, ValueError) as e:
            lines.append(f"{page}: {fn.__name__}: cannot read its records ({e})")
            continue
        for text in [texts] if isinstance(texts, (str, Quote)) else texts:
            if isinstance(text, Quote):
                if (why := text.missing(pages[page])) is not None:
                    lines.append(f"{page}: {fn.__name__}: {why}")
            elif normalised(text) not in normalised(pages[page]):
                shown = normalised(text)
                lines.append(f"{page}: {fn.__name__}: the page does not quote {shown[:300]!r}"
                             + (" ..." if len(shown) > 300 else ""))
    return lines


def main() -> int:
    lines = failures()
    for line in lines:
        print(line)
    print(f"{len(CHECKS)} checks, {len(lines)} failing")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
