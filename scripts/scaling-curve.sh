#!/usr/bin/env bash
# Draws docs/scaling.svg: the instance count of a scaled run over time, against its lag.
# A `sleepy` handler (5 ms of I/O wait per message) gets two bursts of 4,000 messages over 200
# keys, 8 s apart; weir scales between 1 and 64 with --target-drain 1s --scale-down-delay 2s.
# The run's /api/status is sampled every 100 ms. Needs a built weir (WEIR, default the release
# build) and the guest examples.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
weir="${WEIR:-$root/target/release/weir}"
module="$root/guest-examples/target/wasm32-wasip2/release/sleepy.wasm"
dir=$(mktemp -d)
trap 'kill $run 2>/dev/null || true; rm -rf "$dir"' EXIT
export WEIR_DATA_DIR="$dir/data"
"$weir" topics create in --partitions 2 >/dev/null 2>&1
"$weir" topics create out --partitions 2 >/dev/null 2>&1
python3 -c "
for s in range(20):
    for k in range(200):
        print(f'k-{k}\t{s}')" > "$dir/burst.txt"
"$weir" run --module "$module" --topic in --group g --min-instances 1 --max-instances 64 \
  --target-drain 1s --scale-down-delay 2s --admin 127.0.0.1:19464 2>"$dir/run.log" &
run=$!
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:19464/readyz >/dev/null && break; sleep 0.1; done
python3 - "$weir" "$dir" "$root/docs/scaling.svg" <<'PY'
import json, subprocess, sys, threading, time, urllib.request
weir, d, out = sys.argv[1], sys.argv[2], sys.argv[3]
samples, t0, stop = [], time.time(), False
def sample():
    while not stop:
        s = json.load(urllib.request.urlopen("http://127.0.0.1:19464/api/status"))
        samples.append((time.time() - t0, s["instances"], s["desired_instances"], sum(p["lag"] for p in s["partitions"])))
        time.sleep(0.1)
th = threading.Thread(target=sample); th.start()
time.sleep(1)
for burst in range(2):
    subprocess.run([weir, "produce", "in", "--file", f"{d}/burst.txt", "--key-separator", "\t"], check=True, capture_output=True)
    time.sleep(8)
stop = True; th.join()
W, H, L, B, T, R = 720, 300, 50, 40, 20, 50
tmax = samples[-1][0]; imax = 64; lmax = max(1, max(s[3] for s in samples))
x = lambda t: L + (W - L - R) * t / tmax
yi = lambda v: H - B - (H - B - T) * v / imax
yl = lambda v: H - B - (H - B - T) * v / lmax
line = lambda pts, color, dash="": f'<polyline fill="none" stroke="{color}" stroke-width="2" {dash} points="' + " ".join(f"{x(t):.1f},{y:.1f}" for t, y in pts) + '"/>'
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="#999"/><line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="#999"/>',
       f'<line x1="{W-R}" y1="{T}" x2="{W-R}" y2="{H-B}" stroke="#999"/>']
for v in (0, 16, 32, 48, 64):
    svg.append(f'<text x="{L-6}" y="{yi(v)+4:.0f}" text-anchor="end" fill="#2b59c3">{v}</text>')
for v in (0, lmax // 2, lmax):
    svg.append(f'<text x="{W-R+6}" y="{yl(v)+4:.0f}" fill="#c0562b">{v}</text>')
for t in range(0, int(tmax) + 1, 2):
    svg.append(f'<text x="{x(t):.0f}" y="{H-B+16}" text-anchor="middle" fill="#555">{t}s</text>')
svg.append(line([(t, yl(l)) for t, _, _, l in samples], "#c0562b"))
svg.append(line([(t, yi(d)) for t, _, d, _ in samples], "#9aa3b5", 'stroke-dasharray="4 3"'))
svg.append(line([(t, yi(i)) for t, i, _, _ in samples], "#2b59c3"))
svg.append(f'<text x="{L}" y="{T-6}" fill="#2b59c3">instances (running; dashed: desired)</text>')
svg.append(f'<text x="{W-R}" y="{T-6}" text-anchor="end" fill="#c0562b">lag (messages)</text>')
svg.append('</svg>')
open(out, "w").write("\n".join(svg) + "\n")
peak = max(s[1] for s in samples)
print(f"wrote {out}: {len(samples)} samples over {tmax:.1f}s, peak {peak} instances, lag up to {lmax}")
for t, i, dd, l in samples[::5]:
    print(f"{t:5.1f}s instances {i:2d} desired {dd:2d} lag {l}")
PY
