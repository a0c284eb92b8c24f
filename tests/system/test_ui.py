"""The status page on the installed package (issue 12 item 3): over TCP with
the token's login cookie, a job whose command holds <script> shown as text,
its output followed while it runs, the assets from the package; the time a
history page of many jobs takes to load."""

import json

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


def test_status_page_over_tcp(box):
    box.lc("list")
    box.sh(f"cp {CONF} /root/lclusterd.conf.ui")
    try:
        box.sh(f"sed -i 's/^#listen =.*/listen = 127.0.0.1:{PORT}/' {CONF} && "
               "systemctl restart lclusterd")
        box.lc("list")
        command = f"echo '{EVIL}'; sleep 3; echo done"
        uuid = box.lc(f"addjob \"{command}\"", user="alice").stdout.strip()
        box.wait_state(uuid, ("running",))
        out = json.loads(box.sh(f"python3 -c \"$(cat)\" {uuid}", input=BROWSE).stdout)
    finally:
        box.sh(f"cp /root/lclusterd.conf.ui {CONF} && systemctl restart lclusterd")

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
