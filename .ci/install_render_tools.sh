#!/usr/bin/env bash
# Install the external tools used by the render tests (tests/render/):
#   * pdflatex (+ amsmath, bm, mathtools, ... from texlive-latex-recommended)
#     and lmodern (Type 1 fonts for \usepackage[T1]{fontenc}; without it the
#     T1 text fonts come out as METAFONT bitmaps, and cm-super is not needed);
#   * KaTeX, pinned by tests/render/package-lock.json, via `npm ci`.
# Idempotent and quiet: only installs what is missing. Debian/Ubuntu (apt).
# Set SKIP_TEX=1 or SKIP_NODE=1 to skip either half.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
render_dir="$repo_root/tests/render"

if [ "${SKIP_TEX:-0}" != 1 ]; then
    tex_pkgs=(texlive-latex-base texlive-latex-recommended lmodern)
    missing=()
    for p in "${tex_pkgs[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$p")
        fi
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        sudo=""
        if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
        echo "install_render_tools: apt-get install ${missing[*]}"
        apt_log="$(mktemp)"
        # output only shown on failure
        if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
               $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                   --no-install-recommends "${missing[@]}"; } >"$apt_log" 2>&1; then
            cat "$apt_log" >&2
            rm -f "$apt_log"
            echo "install_render_tools: apt-get failed" >&2
            exit 1
        fi
        rm -f "$apt_log"
    fi
    command -v pdflatex >/dev/null || { echo "install_render_tools: pdflatex still missing" >&2; exit 1; }
fi

if [ "${SKIP_NODE:-0}" != 1 ]; then
    command -v node >/dev/null || { echo "install_render_tools: node not found (need Node.js >= 18)" >&2; exit 1; }
    want="$(node -p "require('$render_dir/package-lock.json').packages['node_modules/katex'].version")"
    have="$(node -p "try { require('$render_dir/node_modules/katex/package.json').version } catch (e) { '' }")"
    if [ "$want" != "$have" ]; then
        echo "install_render_tools: npm ci (katex $want) in tests/render"
        npm_log="$(mktemp)"
        if ! (cd "$render_dir" && npm ci --no-audit --no-fund --loglevel=error \
                --engine-strict=false) >"$npm_log" 2>&1; then
            cat "$npm_log" >&2
            rm -f "$npm_log"
            echo "install_render_tools: npm ci failed" >&2
            exit 1
        fi
        rm -f "$npm_log"
    fi
fi
