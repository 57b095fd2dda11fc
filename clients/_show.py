"""Print a corpus result JSON compactly (a debugging aid)."""

import json
import sys

with open(sys.argv[1]) as fh:
    r = json.load(fh)
print(r["model"], r["seconds"], "crash:", (r["crash"] or "")[-600:])
for k, v in r["callbacks"].items():
    bad = [(f["code"], f["severity"], f["message"][:300]) for f in v["findings"] if f["severity"] != "info"]
    print(f"{k:20s} {v['status']:15s}", [m[:200] for m in (v["skipped"] + v["internal_errors"])[:1]], bad)
