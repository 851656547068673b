"""Compare two repro.py outputs row by row: task accuracies equal, routing equal (or none after)."""
import json
import pathlib
import sys

a, b = (json.loads(pathlib.Path(f).read_text()) for f in sys.argv[1:3])
same = diff = 0
for label in a:
    if label not in b or "tasks" not in a[label] or "tasks" not in b[label]:
        print("MISSING/ERROR", label); continue
    ta, tb = a[label]["tasks"], b[label]["tasks"]
    ra, rb = a[label].get("routing"), b[label].get("routing")
    eq = ta == tb and (ra == rb or rb is None)  # after issue 28: no routing accuracy without task modules
    same += eq; diff += not eq
    avg = sum(ta.values()) / len(ta)
    print(f"{'identical' if eq else 'DIFFERENT'}  {label}: avg {100*avg:.2f}  routing {a[label].get('routing')} / {b[label].get('routing')}" + ("" if eq else f"  {ta} vs {tb}"))
print(f"{same} rows identical, {diff} different")
