"""The live status page: the HTML served at ``/`` and the files it loads from ``/static/``.

The page (``static/page.html`` + ``page.js`` + ``page.css``) polls ``status`` every 2 s and draws
progress, the loss terms, learning rate and grad norm, the evaluation score, throughput and the
actors' health with Chart.js (``static/chart.min.js``, v3.9.1, MIT, see
``static/chart.js-LICENSE.txt``). Everything is served by the status app itself, under relative
URLs, so the page works on a cluster without internet access. The files ship inside the
package (pyproject's package-data), so an installed ammd serves them too.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

STATIC_DIR = Path(__file__).with_name("static")

# The files ``/static/<name>`` serves, with their media types; any other name is a 404, so the
# route can never read outside this list (no path from the request reaches the filesystem).
STATIC_FILES: dict[str, str] = {
    "chart.min.js": "text/javascript; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "chart.js-LICENSE.txt": "text/plain; charset=utf-8",
}


@lru_cache(maxsize=1)
def page_html() -> str:
    """The page's HTML (read once; the files do not change while a job runs)."""
    return (STATIC_DIR / "page.html").read_text(encoding="utf-8")


def static_file(name: str) -> Optional[tuple[bytes, str]]:
    """``(content, media type)`` of a file listed in ``STATIC_FILES``; None for any other name."""
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        return None
    return _read(name), media_type


@lru_cache(maxsize=len(STATIC_FILES))  # only listed names reach it, so the cache stays small
def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()
