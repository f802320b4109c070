"""The MLflow UI as a user sees it: a real sweep's sqlite store served by a real `mlflow server` on
127.0.0.1, driven by Debian's headless Chromium through Selenium (chromedriver from the same
package; nothing is downloaded). Screenshots of every page land in the test's tmp folder."""
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

from conftest import BIN, REPO, _free_port, _run, _sweep_file

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
WAIT_S = 90   # generous for 2 busy cores, but bounded


@pytest.fixture
def sweep_store(ray_cluster, tmp_path):
    """A tiny real sweep (digits: CTS and random tickets, system metrics on), run from a folder other
    than its storage's, so artifacts that followed the cwd would show up there."""
    f = _sweep_file(tmp_path, "ui", {"base": str(REPO / "configs" / "digits.yaml"),
                                     "set": {"training.epochs": 3, "training.milestones": [2],
                                             "training.dense_baseline": False, "resources.cpus": 1},
                                     "grid": {"search.method": ["cts", "random"], "search.density": [0.1]},
                                     "mlflow": {"system_metrics": True}})
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    p = _run([f, "--address", ray_cluster, "--quiet"], cwd)
    return tmp_path / "sweeps", cwd, p.stdout


@pytest.fixture
def server(sweep_store):
    """`mlflow server` on a free loopback port serving the sweep's store; stopped (this process only)."""
    store = sweep_store[0]
    port = _free_port()
    log = open(store / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                             "--artifacts-destination", str(store / "mlartifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})   # no job workers
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + WAIT_S
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (store / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "mlflow server did not answer /health"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)   # its own session: the server and its workers only
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # whatever of that session is left
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()


@pytest.fixture
def browser(tmp_path):
    assert CHROMIUM and CHROMEDRIVER, "chromium and chromedriver are part of the test setup (make test installs them)"
    os.environ["SE_OFFLINE"] = "true"   # Selenium Manager must not look for (or download) a browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def test_mlflow_ui_shows_a_sweep_as_a_user_expects(sweep_store, server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    store, cwd, stdout = sweep_store
    wait = WebDriverWait(browser, WAIT_S)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    visible = lambda xpath: wait.until(EC.visibility_of_element_located((By.XPATH, xpath)))
    clickable = lambda xpath: wait.until(EC.element_to_be_clickable((By.XPATH, xpath)))
    trial_link = "//div[@role='gridcell']//a[starts-with(normalize-space(), '{}-d0.1-s0-')]"

    # artifacts live beside the store, not in ./mlruns of the folder the sweep ran from
    assert not (cwd / "mlruns").exists()
    assert len(list((store / "mlartifacts").rglob("mask.pt"))) == 2

    # 1. the link the sweep prints opens the experiment on the sweep's trials: listed flat (no parent
    #    row to expand, no click), best test accuracy first, each showing its data set
    link = re.search(r"^mlflow ui\s+(#\S+)", stdout, re.M).group(1)
    browser.get(f"{server}/{link}")
    visible("//*[@role='columnheader'][normalize-space()='Run Name']")
    cts, random = visible(trial_link.format("cts")), visible(trial_link.format("random"))
    assert "/runs" in browser.current_url and "/overview" not in browser.current_url
    assert not browser.find_elements(By.XPATH, "//div[@role='gridcell']//a[normalize-space()='ui']")   # no parent row
    wait.until(lambda d: len(d.find_elements(By.XPATH, "//div[@role='gridcell']//*[starts-with(normalize-space(), "
                                                       "'digits (')]")) >= 2)
    acc = _test_accuracies(store)
    best, worst = (cts, random) if acc["cts"] >= acc["random"] else (random, cts)
    assert best.location["y"] < worst.location["y"], acc   # sorted by test_accuracy, descending
    visible("//button[normalize-space()='Sort: test_accuracy']")   # the UI says so, and sorts by others
    browser.save_screenshot(str(shots / "1-trials.png"))

    # 2. a trial: its params (the values that applied) and its retrain/test_accuracy chart
    cts.click()
    rows = [visible(f"//*[@role='row'][*[@role='cell'][1][normalize-space()='{param}']]"
                    f"[*[@role='cell'][2][normalize-space()='{value}']]")
            for param, value in (("search.method", "cts"), ("search.density", "0.1"), ("search.lr", "0.1"))]
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", rows[0])   # the params in the shot
    browser.save_screenshot(str(shots / "3-trial.png"))
    tab = "//*[normalize-space()='{}'][self::button or self::a or @role='tab']"
    clickable(tab.format("Model metrics")).click()
    visible("//input[@placeholder='Search metric charts']").send_keys("retrain/test_accuracy")
    legend = visible("//*[contains(normalize-space(), '(retrain/test_accuracy)')]")   # the chart's legend
    assert not browser.find_elements(By.XPATH, "//*[contains(normalize-space(), '(dense/test_accuracy)')]")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", legend)
    time.sleep(2)   # let the chart finish drawing before the screenshot
    browser.save_screenshot(str(shots / "4-trial-metrics.png"))
    clickable(tab.format("System metrics")).click()   # the sweep file turned them on
    visible("//*[contains(normalize-space(), '(system/cpu_utilization_percentage)')]")
    time.sleep(2)
    browser.save_screenshot(str(shots / "5-trial-system-metrics.png"))

    # 3. two trials in the compare view
    browser.get(f"{server}/{link}")
    for name in ("cts", "random"):
        row = visible(trial_link.format(name)).find_element(By.XPATH, "./ancestor::div[@role='row']")
        row.find_element(By.XPATH, ".//input[@type='checkbox']").click()
    clickable("//button[normalize-space()='Compare']").click()
    visible("//*[normalize-space()='Comparing 2 Runs from 1 Experiment']")
    names = visible("//tr[th[normalize-space()='Run Name:'] or td[normalize-space()='Run Name:']]").text
    assert re.search(r"cts-d0\.1-s0-", names) and re.search(r"random-d0\.1-s0-", names), names
    browser.save_screenshot(str(shots / "6-compare.png"))


def _test_accuracies(store) -> dict:
    """Each trial's final test_accuracy as MLflow holds it: {method: value}."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([exp.experiment_id], "tags.`cts.role` = 'trial'")
    return {r.data.tags["cts.method"]: r.data.metrics["test_accuracy"] for r in runs}


def test_the_link_is_a_filter_mlflow_parses_for_any_sweep_name():
    from urllib.parse import parse_qs
    from mlflow.utils.search_utils import SearchUtils
    from cts_ray.sweep.mlflow_log import ui_link
    for name in ("quickstart", "bob's sweep"):
        query = parse_qs(ui_link("3", name).split("?", 1)[1])
        assert query["workflowType"] == ["machine_learning"] and query["orderByAsc"] == ["false"]
        assert query["orderByKey"] == ["metrics.`test_accuracy`"]
        parsed = SearchUtils.parse_search_filter(query["searchFilter"][0])
        assert [(c["key"], c["value"]) for c in parsed] == [("cts.sweep", name), ("cts.role", "trial")]
