"""What a person sees, seen the way a person sees it: a real headless Chromium (Debian's `chromium`
and `chromium-driver`, driven by selenium) on the report of a real sweep and on `mlflow server`'s UI
over the same store. A screenshot of the page is saved when a check fails (to $BROWSER_ARTIFACTS,
else the test's tmp folder). Skipped where no Chromium is installed, except in CI (.ci/run installs it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REAL_SWEEP_GROUP, REPO_ROOT, MlflowServer, sqlite_uri
from mlflow.tracking import MlflowClient

from mlpsweep.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, ROLE_TAG

pytestmark = pytest.mark.slow
WAIT_S = 60  # the longest any page may take to show what is checked (a loaded 2-core CI machine)


def chromium() -> tuple[str, str]:
    """The Chromium binary and its driver; skipped when absent, except in CI, where it fails."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        browser = None
    if browser and driver:
        return browser, driver
    if os.environ.get("CI"):
        pytest.fail("CI must have Chromium, chromedriver and selenium: .ci/run installs them")
    pytest.skip("no Chromium/chromedriver/selenium (apt-get install chromium chromium-driver; pip install -e '.[dev]')")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


@contextmanager
def screenshot_on_failure(driver, name: str, tmp_path: Path) -> Iterator[None]:
    """Save what the page shows when a check inside fails, and say where in the failure."""
    try:
        yield
    except BaseException as err:
        folder = Path(os.environ.get("BROWSER_ARTIFACTS", tmp_path))
        folder.mkdir(parents=True, exist_ok=True)
        shot = folder / f"{name}.png"
        driver.save_screenshot(str(shot))
        raise AssertionError(f"{err} (screenshot: {shot}; page: {driver.current_url})") from err


def wait_for(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(condition, message)


def text_shown(text: str):
    """The page holds `text` (in a panel that may need scrolling to be seen)."""
    return lambda driver: text in driver.execute_script("return document.body.innerText")


@pytest.fixture
def sweep_store(real_sweep: tuple[Path, subprocess.CompletedProcess]) -> Path:
    """The folder (mlflow.db inside) of the real sweep the report's test also reads: 16 jobs, 8 of
    them diverging by design."""
    chromium()  # skip (or fail in CI) before anything else when there is no browser
    folder, trained = real_sweep
    assert trained.returncode == 1, trained.stdout[-3000:] + trained.stderr[-3000:]
    return folder


@pytest.mark.xdist_group(REAL_SWEEP_GROUP)
def test_the_report_shows_every_figure_without_errors(browser, sweep_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    report = [sys.executable, str(REPO_ROOT / "report.py"), "--tracking-uri", sqlite_uri(sweep_store), "--out", str(out)]
    result = subprocess.run(report, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    page = next(out.rglob("report.html"))

    browser.get(page.as_uri())
    with screenshot_on_failure(browser, "report", tmp_path):
        wait_for(browser, lambda d: d.execute_script("return document.readyState") == "complete", "report never loaded")
        images = wait_for(
            browser,
            lambda d: d.execute_script(
                "const imgs = [...document.images];"
                "return imgs.every(i => i.complete) ? imgs.map(i => [i.getAttribute('src'), i.naturalWidth]) : null"
            ),
            "the report's images never finished loading",
        )
        assert len(images) >= 2, images
        assert [src for src, width in images if width == 0] == [], "figures that did not render"
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors


@pytest.mark.xdist_group(REAL_SWEEP_GROUP)
def test_the_mlflow_ui_shows_the_sweep_as_model_training(browser, sweep_store: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    client = MlflowClient(sqlite_uri(sweep_store))
    experiment = client.get_experiment_by_name("mlpsweep")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    runs = client.search_runs([experiment.experiment_id])
    parent = next(run for run in runs if run.data.tags[ROLE_TAG] == "sweep")
    children = sorted({run.info.run_name for run in runs if run.data.tags[ROLE_TAG] == "job"})
    assert len(children) == 8  # 16 runs: each name twice, with lr 0.1 and lr 1e30
    child = next(
        run for run in runs if run.info.run_name == "relu-batchnorm-p0-64x32-s1" and run.info.status == "FINISHED"
    )
    experiment_page = f"#/experiments/{experiment.experiment_id}"

    with MlflowServer(tmp_path / "server", backend_store_uri=sqlite_uri(sweep_store)) as server:
        # the experiment in MLflow's model-training mode lands on its training runs: the sweep, collapsed
        browser.get(f"{server.uri}/{experiment_page}?workflowType=machine_learning")
        with screenshot_on_failure(browser, "training_runs", tmp_path):
            wait_for(browser, lambda d: "/runs" in d.current_url, "the experiment did not open on its training runs")
            parent_link = wait_for(
                browser, lambda d: d.find_elements(By.LINK_TEXT, parent.info.run_name), "no parent run in the list"
            )[0]
            assert not browser.find_elements(By.LINK_TEXT, children[0])  # nested, not beside the parent
            expand = parent_link.find_element(By.XPATH, "./ancestor::*[contains(@class, 'ag-cell-value')][1]//button")
            expand.click()
            for name in children:
                wait_for(browser, lambda d, name=name: d.find_elements(By.LINK_TEXT, name), f"{name} not shown nested")

        # the parent says what the sweep was and what won
        browser.get(f"{server.uri}/{experiment_page}/runs/{parent.info.run_id}")
        with screenshot_on_failure(browser, "parent_run", tmp_path):
            wait_for(browser, text_shown("best_test_acc"), "the parent's metrics are not shown")
            wait_for(browser, text_shown("Best:"), "the parent's description is not shown")

        # a child's metric charts and its artifacts
        browser.get(f"{server.uri}/{experiment_page}/runs/{child.info.run_id}/model-metrics")
        with screenshot_on_failure(browser, "child_metrics", tmp_path):
            # the UI groups charts by the part of a key before its last "/", sorted by name: the key metrics'
            # groups accuracy and loss come first, above the probe's, and their charts are drawn on arrival
            for metric in ("accuracy/train", "accuracy/val", "loss/train", "loss/val"):
                wait_for(browser, text_shown(f"({metric})"), f"no {metric} chart on arrival")
            wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "svg.main-svg"), "no chart drawn")
            page = browser.execute_script("return document.body.innerText")
            groups = [re.search(rf"^{re.escape(g)}\s*\(\d+\)", page, re.MULTILINE) for g in ("accuracy", "loss", "probe/hidden1")]
            assert all(groups) and groups[0].start() < groups[1].start() < groups[2].start(), page[:2000]
        browser.get(f"{server.uri}/{experiment_page}/runs/{child.info.run_id}/artifacts")
        with screenshot_on_failure(browser, "child_artifacts", tmp_path):
            for artifact in ("config.yaml", "learning_curves.png"):
                wait_for(browser, text_shown(artifact), f"no {artifact} among the artifacts")
