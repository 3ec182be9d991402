"""The Dagster UI over the demo world, in headless Chromium: every asset of the graph is shown.

Starts ``dicom-assets dev`` (bundled PACS + ``dagster dev`` on 127.0.0.1), opens the asset graph
in Debian's Chromium through Selenium and Debian's chromedriver, and saves a screenshot to
``test-artifacts/asset-graph.png`` (CI keeps it as an artifact).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dicom_assets_tests.conftest import free_port, require_service, stop_process_group
from dicom_assets_tests.test_definitions import ASSET_KEYS

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _wait_http(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


@pytest.fixture
def dagster_ui(tmp_path: Path):
    port = free_port()
    log = open(tmp_path / "dev.log", "w")
    child = subprocess.Popen(
        [sys.executable, "-m", "dicom_assets.cli", "dev", "--workdir", str(tmp_path / "w"), "--ui-port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        up = _wait_http(f"http://127.0.0.1:{port}/server_info", 180)
        assert up, (tmp_path / "dev.log").read_text()[-3000:]
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(child, 30)
        log.close()


def _expand_groups(driver) -> None:  # noqa: ANN001 - a selenium WebDriver
    """Click every collapsed asset group open (the graph re-renders under a click: try again)."""
    from selenium.webdriver.common.by import By

    for _ in range(12):
        collapsed = driver.find_elements(By.CSS_SELECTOR, '[aria-label="unfold_more"]')
        if not collapsed:
            return
        try:
            collapsed[0].click()
        except Exception:  # noqa: BLE001 - the graph re-renders under the click; try again
            pass
        time.sleep(1)


def _show_whole_graph(driver) -> None:  # noqa: ANN001 - a selenium WebDriver
    """Dismiss the welcome dialog, hide the sidebar, expand every asset group, let the UI re-fit;
    zoom out (expanding again: Dagster may collapse groups of a large graph) until every asset shows."""
    from selenium.webdriver.common.by import By

    time.sleep(3)
    for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
        button.click()
    for toggle in driver.find_elements(By.XPATH, "//input[@placeholder='Jump to…']/following::button[1]"):
        toggle.click()
    _expand_groups(driver)
    driver.refresh()  # the expanded state is kept; a fresh load zooms the graph to fit
    time.sleep(6)
    for _ in range(8):  # the graph renders only what is in view: zoom out until every node is
        if all(f">{key}<" in driver.page_source for key in ASSET_KEYS):
            return
        _expand_groups(driver)
        driver.find_element(By.CSS_SELECTOR, '[aria-label="zoom_out"]').click()
        time.sleep(1)


def test_asset_graph_shows_every_asset(dagster_ui: str) -> None:
    require_service(os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), "Chromium and chromedriver (Debian packages chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=3200,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"{dagster_ui}/asset-groups")
        WebDriverWait(driver, 90).until(lambda d: "discovery" in d.page_source)
        _show_whole_graph(driver)
        missing = [key for key in ASSET_KEYS if f">{key}<" not in driver.page_source]
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "asset-graph.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert not missing
    assert shot.stat().st_size > 10_000
