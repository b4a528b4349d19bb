"""The web page in real headless Chromium: upload a real test image, read the label it shows."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import requests
from PIL import Image

from fashion.contract import CLASS_NAMES
from testing.ood import ood_samples

OCTETS = "application/octet-stream"

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"),
]


def test_upload_shows_label_and_probability_bars(bundled_server, test_set, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    index = 0  # an "Ankle boot" the bundled model gets right
    image_path = tmp_path / "ankle-boot.png"
    Image.fromarray(test_set.data[index].numpy()).resize((112, 112), Image.Resampling.NEAREST).save(image_path)
    expected = CLASS_NAMES[int(test_set.targets[index])]
    api = requests.post(
        bundled_server.url + "/predict", data=image_path.read_bytes(), headers={"Content-Type": "image/png"}, timeout=30
    ).json()
    assert api["label"] == expected

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 760, "height": 900})
            outside = []
            local = (bundled_server.url, "blob:" + bundled_server.url)  # blob: is the preview of the chosen file
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(local) else None)
            page.goto(bundled_server.url + "/")
            assert page.title() == "Fashion-MNIST classifier"
            page.set_input_files("#file", str(image_path))
            page.wait_for_selector("#result:not([hidden])", timeout=15_000)
            assert page.inner_text("#label") == expected
            assert page.locator("#bars li").count() == len(CLASS_NAMES)
            assert page.inner_text("#bars li.top").startswith(expected)
            confidence = float(page.inner_text("#confidence").rstrip("%"))
            assert confidence == pytest.approx(api["confidence"] * 100, abs=0.06)
            assert page.locator("#preview").is_visible()
            page.wait_for_function("document.getElementById('model').textContent.length > 0", timeout=10_000)
            assert page.locator("#uncertain").is_hidden(), "a test garment the service trusts is not shown as a guess"
            page.screenshot(path=str(ARTIFACTS / "browser-predict.png"), full_page=True)

            # Something that is not clothing: the answer is shown as a guess, with the reason in words.
            sample = ood_samples(names=["characters"], per_set=1)["characters"][0]
            not_clothing = tmp_path / ("letters.png" if sample.startswith(b"\x89PNG") else "letters.jpg")
            not_clothing.write_bytes(sample)
            flagged = requests.post(
                bundled_server.url + "/predict", data=sample, headers={"Content-Type": OCTETS}, timeout=30
            ).json()
            assert flagged["uncertain"] and flagged["reason"] == "not_a_garment"
            page.set_input_files("#file", str(not_clothing))
            page.wait_for_selector("#uncertain:not([hidden])", timeout=15_000)
            assert "does not look like" in page.inner_text("#uncertain")
            page.screenshot(path=str(ARTIFACTS / "browser-not-a-garment.png"), full_page=True)

            # A file the service refuses shows its message, not a broken page.
            bad = tmp_path / "notes.txt"
            bad.write_text("not an image")
            page.set_input_files("#file", str(bad))
            page.wait_for_selector("#error:not([hidden])", timeout=15_000)
            assert "image" in page.inner_text("#error").lower()
            page.screenshot(path=str(ARTIFACTS / "browser-error.png"), full_page=True)
        finally:
            browser.close()
    assert outside == [], f"the page fetched something from elsewhere: {outside}"


def test_page_and_assets_are_served_by_the_app(bundled_server):
    page = requests.get(bundled_server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    for asset in ("/static/app.js", "/static/style.css", "/static/favicon.svg"):
        assert asset in page.text
        assert requests.get(bundled_server.url + asset, timeout=10).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text
