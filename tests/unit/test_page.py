"""The live page's files: served by the status app itself, loading nothing from another host.

What the page draws is checked in a real browser (tests/integration/test_status_page.py).
"""
import re
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.page import STATIC_DIR, STATIC_FILES
from services.status import ENDPOINTS, JobStatus, make_app

ROOT = Path(__file__).resolve().parents[2]
URL_ATTRS = {"src", "href"}


class Links(HTMLParser):
    """Every src/href in the page."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in URL_ATTRS and value]


@pytest.fixture
def client():
    return TestClient(make_app(JobStatus("t", 10)))


def page_urls(html: str) -> list[str]:
    parser = Links()
    parser.feed(html)
    return parser.urls


def test_page_loads_only_relative_urls_that_the_app_serves(client):
    answer = client.get("/")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    urls = page_urls(answer.text)
    assert "static/chart.min.js" in urls and "static/page.js" in urls
    for url in urls:
        # Relative (no scheme, no host, no leading /): offline, and right behind a path prefix.
        assert not re.match(r"^([a-z][a-z0-9+.-]*:|/)", url, re.I), url
        served = client.get("/" + url)
        assert served.status_code == 200, url
        assert served.content == (STATIC_DIR / url.removeprefix("static/")).read_bytes()


def test_page_script_fetches_only_the_status_endpoint():
    text = (STATIC_DIR / "page.js").read_text()
    assert not re.search(r"\bhttps?://|[\"'`]//", text), "page.js names another host"
    assert re.findall(r"fetch\(\s*([^,)]+)", text) == ['"status"']  # relative: /status of this app
    for name in ("page.html", "page.css"):
        assert not re.search(r"\bhttps?://", (STATIC_DIR / name).read_text()), name


def test_static_serves_chart_js_with_its_media_type(client):
    answer = client.get("/static/chart.min.js")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/javascript")
    assert answer.text.startswith("/*!\n * Chart.js v3.9.1") and "Released under the MIT License" in answer.text
    assert "Permission is hereby granted" in client.get("/static/chart.js-LICENSE.txt").text


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/..%2Fstatus.py", "/static/page.html.bak",
                                  "/static/", "/static/sub/page.js"])
def test_static_answers_404_json_for_unlisted_files(client, path):
    answer = client.get(path)
    assert answer.status_code == 404
    assert answer.json()["endpoints"] == list(ENDPOINTS)


def test_every_endpoint_named_in_the_404_answer_is_served(client):
    assert {f"/static/{name}" for name in STATIC_FILES} <= set(ENDPOINTS)
    for path in ENDPOINTS:
        assert client.get(path).status_code == 200, path


def test_package_data_ships_every_static_file():
    """An installed (non-editable) ammd holds the page's files: pyproject's package-data covers them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["services"]
    shipped = {p.relative_to(STATIC_DIR.parent).as_posix() for pattern in patterns
               for p in STATIC_DIR.parent.glob(pattern)}
    assert {f"static/{name}" for name in [*STATIC_FILES, "page.html"]} <= shipped
