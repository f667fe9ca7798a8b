"""Makes what the second Schemathesis pass looks up: a completed upload of STORE, a collection
over STORE and an unknown store that has expired and settled, and a schedule. Prints their ids
on one line. Standard library only."""

import json
import os
import sys
import time
import urllib.error
import urllib.request

BASE = os.environ["BASE"]
TOKEN = os.environ["TOKEN"]
STORE = os.environ["STORE"]


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method)
    req.add_header("authorization", f"Bearer {TOKEN}")
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def wait(what, check, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    sys.exit(f"seed: {what} did not happen within {timeout} s")


wait("the store connecting", lambda: call("GET", f"/status/{STORE}")[1].get("connected"))
status, started = call("POST", f"/trigger-download/{STORE}")
assert status == 202, started
upload = started["upload_id"]
done = wait("the upload finishing", lambda: (lambda s: s if s["state"] in ("completed", "failed", "cancelled") else None)(call("GET", f"/uploads/{upload}")[1]))
assert done["state"] == "completed", done

status, collection = call("POST", "/collections", {
    "target": {"kind": "ids", "client_ids": [STORE, "st-never-seen"]},
    "expires_in_secs": 3,
})
assert status == 201, collection
cid = collection["collection_id"]
wait("the collection settling", lambda: (lambda s: s["settled"] and s["state"] == "expired")(call("GET", f"/collections/{cid}")[1]))

status, schedule = call("POST", "/schedules", {"cron": "0 3 1 1 *", "template": {"target": {"kind": "all"}}})
assert status == 201, schedule
print(upload, cid, schedule["schedule_id"])
