"""Compare two pytest junit XML reports test by test: ``compare_junit.py NAME UNPATCHED.xml PATCHED.xml``.

Prints each run's counts; exits 1 when any test ended differently (passed / skipped / failed / error), listing
those tests, or when a run collected nothing.
"""
import sys
import xml.etree.ElementTree as ET
from collections import Counter


def outcomes(path):
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        out[tid] = ("error" if "error" in kinds else "failed" if "failure" in kinds
                    else "skipped" if "skipped" in kinds else "passed")
    return out


def main(name, unpatched, patched):
    a, b = outcomes(unpatched), outcomes(patched)
    counts = [", ".join(f"{n} {k}" for k, n in sorted(Counter(o.values()).items())) or "nothing" for o in (a, b)]
    print(f"upstream {name}: unpatched: {counts[0]}; patched: {counts[1]}")
    if not a or not b:
        print(f"upstream {name}: a run collected no test")
        return 1
    differ = sorted(t for t in set(a) | set(b) if a.get(t) != b.get(t))
    for t in differ:
        print(f"  {t}: unpatched {a.get(t, 'absent')}, patched {b.get(t, 'absent')}")
    if differ:
        print(f"upstream {name}: {len(differ)} test(s) end differently with the patch")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
