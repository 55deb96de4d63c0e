#!/usr/bin/env bash
# Build the six release artifacts (sdist + wheel of shared-dist, rrcm-diffusers, conan-st)
# into dist/ and check that an index would accept them:
#   - `twine check --strict` (metadata and the README that becomes the index page render),
#   - no Requires-Dist is a direct reference (`name @ file://...`): dependencies go by name,
#   - each artifact carries its LICENSE, and its version equals the package's __version__.
# Usage: bash scripts/build_release.sh [OUT_DIR]   (default dist/; only *.whl/*.tar.gz of
# these three packages in it are replaced, nothing else is touched)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-dist}
PY=.venv/bin/python
[ -x "$PY" ] || bash scripts/setup.sh
mkdir -p "$OUT"
rm -f "$OUT"/shared_dist-* "$OUT"/rrcm_diffusers-* "$OUT"/conan_st-*
for pkg in shared-dist rrcm-diffusers conan-st; do
    "$PY" -m build --sdist --wheel --outdir "$OUT" "packages/$pkg" > "$OUT/.build-$pkg.log" 2>&1 \
        || { cat "$OUT/.build-$pkg.log"; echo "build_release: building $pkg failed" >&2; exit 1; }
    rm -f "$OUT/.build-$pkg.log"
done
"$PY" -m twine check --strict "$OUT"/*.whl "$OUT"/*.tar.gz
"$PY" - "$OUT" <<'EOF'
import email, sys, tarfile, zipfile
from pathlib import Path

out = Path(sys.argv[1])
expected = {"shared_dist", "rrcm_diffusers", "conan_st"}
problems, seen = [], {}
for path in sorted(out.glob("*.whl")) + sorted(out.glob("*.tar.gz")):
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    else:
        with tarfile.open(path) as t:
            names = t.getnames()
            meta = t.extractfile(next(n for n in names if n.count("/") == 1 and n.endswith("/PKG-INFO")))
            meta = meta.read().decode()
    msg = email.message_from_string(meta)
    name, version = msg["Name"].replace("-", "_"), msg["Version"]
    seen.setdefault(name, set()).add((path.suffix, version))
    direct = [r for r in msg.get_all("Requires-Dist") or [] if "@" in r.split(";")[0]]
    if direct:
        problems.append(f"{path.name}: direct references in Requires-Dist: {direct}")
    if not any(n.rsplit("/", 1)[-1] == "LICENSE" for n in names):
        problems.append(f"{path.name}: no LICENSE file inside")
    init = Path("packages") / msg["Name"] / "src" / name / "__init__.py"
    if f'__version__ = "{version}"' not in init.read_text():
        problems.append(f"{path.name}: version {version} is not {init}'s __version__")
    size = path.stat().st_size / 1024
    print(f"  {path.name:<45} {size:8.1f} KiB  requires: {', '.join(msg.get_all('Requires-Dist') or [])[:70]}")
missing = {n for n in expected if len(seen.get(n, ())) != 2}
if missing:
    problems.append(f"missing sdist or wheel for {sorted(missing)}")
if problems:
    sys.exit("build_release: " + "\n  ".join(["FAILED", *problems]))
print(f"build_release: 6 artifacts in {out}/ pass twine check --strict; dependencies by name; LICENSE inside")
EOF
