import json, sys
a = json.load(open(sys.argv[1])); b = json.load(open(sys.argv[2]))
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
