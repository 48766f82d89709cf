#!/usr/bin/env bash
# Re-create book/_extra/_static/{widgets,mathjax}/: the JavaScript that draws ipywidgets and equations in
# the built site, so that no page needs a CDN (see _config.yml: nb_ipywidgets_js, mathjax_path).
# Needs node/npm and the npm registry. The result is committed; run this only to change versions.
set -euo pipefail
HTML_MANAGER=1.0.6   # the bundle myst-nb 1.x loads by default (ipywidgets 8 widget state)
REQUIREJS=2.3.4      # the require.js myst-nb 1.x loads by default
MATHJAX=3.2.2        # MathJax 3, what Sphinx 7 loads by default

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/book/_extra/_static/widgets"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm install --silent --no-audit --no-fund --ignore-scripts \
    "@jupyter-widgets/html-manager@$HTML_MANAGER" "requirejs@$REQUIREJS" "mathjax@$MATHJAX" >/dev/null)
dist="$work/node_modules/@jupyter-widgets/html-manager/dist"

rm -rf "$out"
mkdir -p "$out/licenses"
cp "$dist/embed-amd.js" "$work/node_modules/requirejs/require.js" "$out/"
# The bundle loads Font Awesome's fonts from its own folder; every current browser takes the
# woff2, so the eot/ttf/svg/woff copies are left out.
for font in $(grep -o '[0-9a-f]\{20\}\.woff2' "$dist/embed-amd.js" | sort -u); do
    cp "$dist/$font" "$out/"
done
cp "$work/node_modules/@jupyter-widgets/html-manager/LICENSE" "$out/licenses/html-manager-BSD-3-Clause.txt"
cp "$dist/embed.js.LICENSE.txt" "$out/licenses/html-manager-bundled-notices.txt"
# The requirejs package ships no licence file; require.js's header names the MIT licence.
{
    echo "require.js $REQUIREJS: $(grep -o 'Copyright [^.]*' "$out/require.js" | head -1)."
    echo "Released under the MIT licence (as its header says):"
    echo
    cat <<'MIT'
Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
MIT
} > "$out/licenses/requirejs-MIT.txt"
cp "$work/node_modules/@fortawesome/fontawesome-free/LICENSE.txt" "$out/licenses/fontawesome-free.txt"
cat > "$out/SOURCES.txt" <<TXT
Files copied unchanged from the npm registry by tools/vendor_web_assets.sh:
  embed-amd.js, *.woff2         @jupyter-widgets/html-manager@$HTML_MANAGER (dist/), BSD-3-Clause;
                                 the fonts are Font Awesome Free (SIL OFL 1.1)
  require.js                     requirejs@$REQUIREJS, MIT
Licences and notices: licenses/.
TXT

# MathJax: the combined TeX + CommonHTML component with every TeX extension built in (so nothing
# is loaded on demand) and its web fonts, which it finds relative to its own location.
mj="$root/book/_extra/_static/mathjax"
rm -rf "$mj"
mkdir -p "$mj/output/chtml/fonts"
cp "$work/node_modules/mathjax/es5/tex-chtml-full.js" "$mj/"
cp -r "$work/node_modules/mathjax/es5/output/chtml/fonts/woff-v2" "$mj/output/chtml/fonts/"
cp "$work/node_modules/mathjax/LICENSE" "$mj/LICENSE-Apache-2.0.txt"
echo "Copied unchanged from the npm package mathjax@$MATHJAX (es5/) by tools/vendor_web_assets.sh; Apache-2.0." > "$mj/SOURCES.txt"
du -sh "$out" "$mj"
