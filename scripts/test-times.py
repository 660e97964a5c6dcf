#!/usr/bin/env python3
"""The slowest tests of the last `scripts/test.sh`, from cargo-nextest's JUnit reports
(target/nextest/*/junit.xml): `scripts/test-times.py [COUNT]` prints a Markdown table of the
COUNT slowest (default 20), then the number of tests and their summed time."""
import glob
import os
import sys
import xml.etree.ElementTree as ET

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
count = int(sys.argv[1]) if len(sys.argv) > 1 else 20
cases = []
for path in sorted(glob.glob(os.path.join(target, "nextest", "*", "junit.xml"))):
    profile = os.path.basename(os.path.dirname(path))
    for case in ET.parse(path).getroot().iter("testcase"):
        failed = case.find("failure") is not None or case.find("error") is not None
        cases.append((float(case.get("time", "0")), case.get("name"), profile, failed))
if not cases:
    sys.exit("no JUnit reports under target/nextest/: run scripts/test.sh first")
cases.sort(reverse=True)
print(f"| test | seconds | pass |")
print("|---|---:|---|")
for secs, name, profile, failed in cases[:count]:
    print(f"| `{name}`{' (alone)' if profile == 'measured' else ''} | {secs:.1f} | {'FAIL' if failed else 'ok'} |")
print(f"\n{len(cases)} tests, {sum(c[0] for c in cases):.0f} s of test time in all")
