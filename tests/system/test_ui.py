"""The status page on the installed package (issue 12 item 3): over TCP with
the token's login cookie, a job whose command holds <script> shown as text,
its output followed while it runs, the assets from the package; and the same
in a real browser (Debian's chromium, chromium-driver, python3-selenium on
the host, run in the container's network namespace), screenshots in dist/."""

import json
import os
import subprocess

import pytest

from tests.system.conftest import DIST

CONF = "/etc/lclusterd/lclusterd.conf"
PORT = 7800

# Run inside the container as root: log in (a wrong token first), open the
# job's page and follow its output; print what was seen as JSON.
BROWSE = r"""
import http.client, json, sys, time, urllib.parse
uuid = sys.argv[1]
token = open("/etc/lclusterd/token").read().strip()
def get(path, cookie=None, method="GET", body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", %(port)d, timeout=30)
    h = dict(headers or {})
    if cookie:
        h["Cookie"] = cookie
    c.request(method, path, body=body, headers=h)
    return c, c.getresponse()
form = {"Content-Type": "application/x-www-form-urlencoded"}
out = {}
c, r = get("/ui/", )
out["anonymous"] = [r.status, r.getheader("Location")]
c, r = get("/ui/login", method="POST", body="token=wrong", headers=form)
out["wrong"] = [r.status, r.getheader("Set-Cookie"), "wrong token" in r.read().decode()]
c, r = get("/ui/login", method="POST", body=urllib.parse.urlencode({"token": token}), headers=form)
r.read()
cookie = r.getheader("Set-Cookie")
out["cookie"] = cookie
jar = cookie.split(";")[0]
c, r = get("/ui/jobs/" + uuid, jar)
out["page"] = [r.status, r.read().decode()]
c, r = get("/ui/static/ui.css", jar)
out["css"] = [r.status, len(r.read())]
c, r = get("/ui/jobs/%%s/output?follow=1" %% uuid, jar)
first = r.readline().decode()
t = time.monotonic()
rest = r.read().decode()
out["output"] = [r.status, r.getheader("Content-Type"), first, rest, time.monotonic() - t]
took = []
for path in ("/ui/", "/ui/history", "/ui/queue", "/ui/running"):
    t = time.monotonic()
    c, r = get(path, jar)
    r.read()
    took.append([path, r.status, time.monotonic() - t])
out["took"] = took
c, r = get("/v1/jobs", jar)
out["api_with_cookie"] = r.status
print(json.dumps(out))
""" % {"port": PORT}

EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def listening(box):
    """The node with its TCP listener on (restored afterwards)."""
    box.lc("list")
    box.sh(f"cp {CONF} /root/lclusterd.conf.ui")
    box.sh(f"sed -i 's/^#listen =.*/listen = 127.0.0.1:{PORT}/' {CONF} && systemctl restart lclusterd")
    box.lc("list")
    yield box
    box.sh(f"cp /root/lclusterd.conf.ui {CONF} && systemctl restart lclusterd")


def slow_evil_job(box, seconds=3):
    command = f"echo '{EVIL}'; sleep {seconds}; echo done"
    uuid = box.lc(f"addjob \"{command}\"", user="alice").stdout.strip()
    box.wait_state(uuid, ("running",))
    return uuid


def test_status_page_over_tcp(listening):
    box = listening
    uuid = slow_evil_job(box)
    out = json.loads(box.sh(f"python3 -c \"$(cat)\" {uuid}", input=BROWSE).stdout)

    assert out["anonymous"] == [303, "/ui/login?next=%2Fui%2F"]
    assert out["wrong"] == [401, None, True]  # says so, sets nothing
    assert "HttpOnly" in out["cookie"] and "SameSite=Strict" in out["cookie"]
    status, page = out["page"]
    assert status == 200 and EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert out["css"][0] == 200 and out["css"][1] > 100  # the asset came with the package
    status, kind, first, rest, waited = out["output"]
    assert status == 200 and kind.startswith("text/plain")
    assert first == EVIL + "\n" and rest == "done\n"  # followed until the job ended
    assert waited > 1  # the rest came as the job ran, not at once
    assert all(status == 200 for _, status, _ in out["took"]), out["took"]
    assert out["api_with_cookie"] == 401  # the cookie opens the page, not the API
    print("ui page load:", ", ".join(f"{p} {t * 1000:.0f} ms" for p, _, t in out["took"]))


# Run on the host in the container's network namespace (nsenter -n): log in
# with a wrong token, then the right one, open the running job's page and
# watch its output arrive; screenshots; print what was seen as JSON.
SELENIUM = r"""
import json, sys, time
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import (NoAlertPresentException, StaleElementReferenceException,
                                        WebDriverException)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
base, token, uuid, shots = sys.argv[1:5]
options = webdriver.ChromeOptions()
for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1280,900"):
    options.add_argument(arg)
options.binary_location = "/usr/bin/chromium"
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
out = {}
try:
    # The page re-renders the record as the job moves on: an element read
    # in the middle of that is stale; ask again rather than fail.
    wait = WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,
                                                         WebDriverException))
    driver.get(base + "/ui/")
    out["login_url"] = driver.current_url
    driver.find_element(By.NAME, "token").send_keys("wrong")
    driver.find_element(By.CSS_SELECTOR, "form.login button").click()
    # The click only sends the form: wait for the answer's page (a slow
    # container once had none yet).
    error = wait.until(lambda d: d.find_elements(By.ID, "login-error"))[0]
    out["wrong"] = [error.text, driver.get_cookies()]
    driver.find_element(By.NAME, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form.login button").click()
    wait.until(lambda d: d.current_url == base + "/ui/")
    out["cookie"] = [{k: c.get(k) for k in ("name", "httpOnly", "sameSite")} for c in driver.get_cookies()]
    out["cluster"] = driver.find_element(By.CSS_SELECTOR, "table.nodes").text
    t = time.monotonic()
    driver.get(base + "/ui/jobs/" + uuid)
    out["job_load"] = time.monotonic() - t
    output = driver.find_element(By.ID, "output")
    wait.until(lambda d: "<script>" in output.text)
    out["first"] = output.text
    driver.save_screenshot(shots + "/ui-job-running.png")
    wait.until(lambda d: "done" in d.find_element(By.ID, "output").text)
    out["followed"] = driver.find_element(By.ID, "output").text
    try:
        driver.switch_to.alert
        out["alert"] = True
    except NoAlertPresentException:
        out["alert"] = False
    wait.until(lambda d: "succeeded" in d.find_element(By.CSS_SELECTOR, "table.record").text)
    driver.save_screenshot(shots + "/ui-job-ended.png")
    t = time.monotonic()
    driver.get(base + "/ui/history")
    out["history_load"] = time.monotonic() - t
    out["history"] = driver.find_element(By.CSS_SELECTOR, "table.jobs").text
    driver.save_screenshot(shots + "/ui-history.png")
finally:
    driver.quit()
print(json.dumps(out))
"""


def test_status_page_in_a_browser(listening, tmp_path):
    box = listening
    for tool in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        assert os.access(tool, os.X_OK), (f"{tool} missing: apt-get install chromium "
                                          "chromium-driver python3-selenium (make deps)")
    token = box.sh("cat /etc/lclusterd/token").stdout.strip()
    uuid = slow_evil_job(box, seconds=4)
    DIST.mkdir(exist_ok=True)
    script = tmp_path / "drive.py"
    script.write_text(SELENIUM)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    run = subprocess.run(["nsenter", "-t", str(box.c.init_pid), "-n", "/usr/bin/python3", str(script),
                          f"http://127.0.0.1:{PORT}", token, uuid, str(DIST)],
                         capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["login_url"].endswith("/ui/login?next=%2Fui%2F")
    assert out["wrong"] == ["wrong token: not logged in", []]  # says so, sets nothing
    assert out["cookie"] == [{"name": "lclusterd_ui", "httpOnly": True, "sameSite": "Strict"}]
    assert box.sh("hostname").stdout.strip() in out["cluster"]
    assert out["first"].startswith(EVIL)  # the markup is shown as text ...
    assert out["alert"] is False  # ... and never ran
    assert out["followed"] == f"{EVIL}\ndone"  # arrived while the page was open
    assert EVIL in out["history"]  # the command, as text
    for name in ("ui-job-running.png", "ui-job-ended.png", "ui-history.png"):
        assert (DIST / name).stat().st_size > 1000
    print(f"browser: job page {out['job_load'] * 1000:.0f} ms, history {out['history_load'] * 1000:.0f} ms;"
          f" screenshots {DIST}/ui-job-running.png, {DIST}/ui-job-ended.png")
