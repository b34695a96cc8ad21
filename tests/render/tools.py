"""Helpers that prove exported math really renders.

* Markdown: :func:`extract_markdown_math` finds the ``$...$`` / ``$$...$$`` math,
  :func:`katex_errors` parses it with KaTeX (via ``katex_check.js`` under node).
* LaTeX: :func:`compile_latex` runs ``pdflatex``; :func:`overfull_boxes` and
  :func:`bitmap_fonts` inspect the log for layout/font problems.
* :func:`have_node` / :func:`have_pdflatex` are for ``pytest.skip`` decisions.

Install the external tools with ``.ci/install_render_tools.sh``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

RENDER_DIR = Path(__file__).resolve().parent
KATEX_SCRIPT = RENDER_DIR / "katex_check.js"

__all__ = [
    "RenderToolMissing",
    "bitmap_fonts",
    "compile_latex",
    "ensure_katex",
    "extract_markdown_math",
    "have_node",
    "have_pdflatex",
    "katex_errors",
    "latex_errors",
    "overfull_boxes",
]


class RenderToolMissing(RuntimeError):
    """An external program (node, npm, pdflatex) needed for a render check is absent."""


# --------------------------------------------------------------------------- availability


def have_node() -> bool:
    """True if ``node`` is on PATH (``npm`` is needed too, once, unless node_modules exists)."""
    return shutil.which("node") is not None


def have_pdflatex() -> bool:
    """True if ``pdflatex`` is on PATH."""
    return shutil.which("pdflatex") is not None


# --------------------------------------------------------------------------- Markdown math

_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_ASCII_PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def extract_markdown_math(md: str, *, strict: bool = True) -> list[tuple[str, bool]]:
    """Return the math in a Markdown document as ``[(tex, display), ...]`` in document order.

    Recognised (pandoc ``tex_math_dollars`` / GitHub rules):

    * ``$$ ... $$`` -- display math, may span several lines, but not a blank line.
    * ````` ```math ````` fenced blocks -- display math (GitHub syntax).
    * ``$ ... $`` -- inline math. The opening ``$`` must be followed by a non-space,
      the closing ``$`` preceded by a non-space and not followed by a digit, so
      ``costs $5 or $10`` contains no math. It must close before a blank line.

    Ignored: fenced code blocks (````` ``` ````` / ``~~~``, any indentation), code
    spans (backtick runs, CommonMark matching), backslash-escaped ``\\$`` outside
    math, and ``\\$`` / ``\\\\`` inside math (they do not close it). Indented
    (4-space) code blocks are *not* recognised -- exporters should use fences.

    The returned tex has no delimiters and is stripped of surrounding whitespace.

    With ``strict`` (the default) an unclosed ``$$`` or ````` ```math ````` fence
    raises ``ValueError`` -- renderers would show it as raw text, which is exactly
    the kind of export bug the render tests are meant to catch. With
    ``strict=False`` an unclosed ``$$`` is treated as literal text.
    """
    md = md.replace("\r\n", "\n").replace("\r", "\n")
    out: list[tuple[str, bool]] = []
    prose: list[str] = []  # lines of the current non-code stretch

    def flush() -> None:
        if prose:
            out.extend(_inline_scan("\n".join(prose), strict=strict))
            prose.clear()

    lines = md.split("\n")
    i = 0
    while i < len(lines):
        m = _FENCE_OPEN.match(lines[i])
        if m and not (m["fence"][0] == "`" and "`" in m["info"]):
            fence = m["fence"]
            info = m["info"].strip()
            close = re.compile(
                r"^[ \t]*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$"
            )
            j = i + 1
            while j < len(lines) and not close.match(lines[j]):
                j += 1
            flush()
            is_math = info.split()[0].lower() == "math" if info else False
            if is_math:
                if j >= len(lines) and strict:
                    raise ValueError(f"unclosed ```math fence opened at line {i + 1}")
                out.append(("\n".join(lines[i + 1 : j]).strip(), True))
            i = j + 1  # an unclosed code fence runs to the end of the document
            continue
        prose.append(lines[i])
        i += 1
    flush()
    return out


def _find_code_span_end(text: str, start: int, n: int) -> int:
    """Index just past the backtick run of exactly ``n`` closing a code span opened at
    ``start`` (just past the opening run), or -1. Code spans do not cross blank lines."""
    limit = _BLANK_LINE.search(text, start)
    end = limit.start() if limit else len(text)
    for m in re.finditer(r"`+", text[start:end]):
        if len(m.group()) == n:
            return start + m.end()
    return -1


def _skip_tex(text: str, j: int) -> int:
    """In math, a backslash takes the next character with it (so ``\\$`` and ``\\\\``
    cannot close the math)."""
    return j + 2 if text[j] == "\\" else j + 1


def _inline_scan(text: str, *, strict: bool) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    n = len(text)
    i = 0
    while i < n:
        c = text[i]
        if c == "\\":
            # Markdown escape: backslash + ASCII punctuation is that literal character.
            i += 2 if i + 1 < n and text[i + 1] in _ASCII_PUNCT else 1
            continue
        if c == "`":
            run = len(re.match(r"`+", text[i:]).group())
            end = _find_code_span_end(text, i + run, run)
            i = end if end >= 0 else i + run  # unmatched run is literal text
            continue
        if c != "$":
            i += 1
            continue
        if text.startswith("$$", i):
            j = i + 2
            close = -1
            while j < n:
                if text.startswith("$$", j):
                    close = j
                    break
                if text[j] == "\n" and _BLANK_LINE.match(text, j):
                    break
                j = _skip_tex(text, j)
            if close < 0:
                if strict:
                    line = text.count("\n", 0, i) + 1
                    raise ValueError(
                        f"unclosed $$ display math (line {line} of its paragraph block): "
                        f"{text[i : i + 40]!r}"
                    )
                i += 2
                continue
            out.append((text[i + 2 : close].strip(), True))
            i = close + 2
            continue
        # inline $...$
        if i + 1 >= n or text[i + 1].isspace():
            i += 1
            continue
        j = i + 1
        close = -1
        while j < n:
            if text[j] == "$":
                if not text[j - 1].isspace() and not (j + 1 < n and text[j + 1].isdigit()):
                    close = j
                break  # a `$` that cannot close ends the attempt (pandoc behaviour)
            if text[j] == "\n" and _BLANK_LINE.match(text, j):
                break
            j = _skip_tex(text, j)
        if close < 0:
            i += 1
            continue
        out.append((text[i + 1 : close].strip(), False))
        i = close + 1
    return out


# --------------------------------------------------------------------------- KaTeX


def _katex_installed_version() -> str | None:
    pkg = RENDER_DIR / "node_modules" / "katex" / "package.json"
    try:
        return json.loads(pkg.read_text(encoding="utf-8"))["version"]
    except (OSError, ValueError, KeyError):
        return None


def _katex_locked_version() -> str:
    lock = json.loads((RENDER_DIR / "package-lock.json").read_text(encoding="utf-8"))
    return lock["packages"]["node_modules/katex"]["version"]


def ensure_katex() -> None:
    """Make sure ``tests/render/node_modules`` holds the locked KaTeX (``npm ci`` if not)."""
    if not have_node():
        raise RenderToolMissing("node is not on PATH; install Node.js >= 18 to check Markdown math")
    if _katex_installed_version() == _katex_locked_version():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RenderToolMissing(
            f"npm is not on PATH and {RENDER_DIR / 'node_modules'} is missing or stale; "
            "run .ci/install_render_tools.sh"
        )
    lock_path = Path(tempfile.gettempdir()) / "symbp-render-npm-ci.lock"
    with open(lock_path, "w") as lock_file:
        try:
            import fcntl

            fcntl.flock(lock_file, fcntl.LOCK_EX)  # serialise parallel test workers
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        if _katex_installed_version() == _katex_locked_version():
            return
        proc = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error", "--engine-strict=false"],
            cwd=RENDER_DIR,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"`npm ci` in {RENDER_DIR} failed (exit {proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )


def katex_errors(blocks: Iterable[tuple[str, bool] | str], *, strict: str = "error") -> list[str]:
    """Parse every math block with KaTeX; return one message per failing block.

    ``blocks`` is what :func:`extract_markdown_math` returns (``(tex, display)``
    pairs); a bare string counts as inline math. An empty list means everything
    parsed. Each message names the block (index, inline/display, its tex) and
    KaTeX's error. ``strict`` is KaTeX's ``strict`` setting: ``"error"`` (default,
    rejects LaTeX-incompatible input too), ``"warn"`` or ``"ignore"``.
    Untrusted commands (``\\href``, ``\\url``, ``\\includegraphics``...) are
    reported as errors. See ``katex_check.js`` for details.
    """
    items = [(b, False) if isinstance(b, str) else (b[0], bool(b[1])) for b in blocks]
    if not items:
        return []
    ensure_katex()
    payload = json.dumps([{"tex": tex, "display": display} for tex, display in items])
    proc = subprocess.run(
        ["node", str(KATEX_SCRIPT), f"--strict={strict}"],
        input=payload,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"katex_check.js failed (exit {proc.returncode}): {proc.stderr}")
    results = json.loads(proc.stdout)
    if len(results) != len(items):
        raise RuntimeError(f"katex_check.js returned {len(results)} results for {len(items)}")
    errors = []
    for k, ((tex, display), res) in enumerate(zip(items, results, strict=True)):
        if not res["ok"]:
            kind = "display" if display else "inline"
            errors.append(f"[{k}] {kind} {tex!r}: {res['error']}")
    return errors


# --------------------------------------------------------------------------- LaTeX

_RERUN = re.compile(r"Rerun to get|Label\(s\) may have changed|No file \S+\.(?:toc|lof|lot)\b")
_OVERFULL = re.compile(r"^Overfull \\hbox \((?P<pt>[0-9.]+)pt too wide\).*$", re.MULTILINE)
_PK_FONT = re.compile(r"[^<>{}\s]+\.\d+pk\b")


def compile_latex(
    tex: str,
    workdir: str | os.PathLike[str],
    *,
    jobname: str = "doc",
    max_runs: int = 3,
    timeout: float = 120,
) -> tuple[bool, str, Path | None]:
    """Compile ``tex`` with pdflatex in ``workdir``; return ``(ok, log, pdf_path)``.

    Runs ``pdflatex -interaction=nonstopmode -halt-on-error`` on
    ``workdir/<jobname>.tex``, again (up to ``max_runs`` in all) while the log asks
    for a rerun (cross-references, toc). ``ok`` is False if pdflatex exits non-zero,
    the log has any ``!`` error line, or no PDF was written. ``log`` is the
    ``.log`` file of the last run (unwrapped: ``max_print_line`` is raised so each
    message is on one line), or pdflatex's console output if there is no log.
    ``pdf_path`` is the PDF, or None if none was produced.
    """
    if not have_pdflatex():
        raise RenderToolMissing("pdflatex is not on PATH; run .ci/install_render_tools.sh")
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    src = wd / f"{jobname}.tex"
    pdf = wd / f"{jobname}.pdf"
    logf = wd / f"{jobname}.log"
    src.write_text(tex, encoding="utf-8")
    for stale in (pdf, logf):
        stale.unlink(missing_ok=True)
    env = dict(os.environ, max_print_line="100000", error_line="254", half_error_line="238")
    log = ""
    rc = 0
    for _ in range(max(1, max_runs)):
        try:
            proc = subprocess.run(
                ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", src.name],
                cwd=wd,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode("utf-8", "replace")
            return False, f"pdflatex timed out after {timeout}s\n{out}", None
        rc = proc.returncode
        try:
            log = logf.read_bytes().decode("utf-8", "replace")
        except OSError:
            log = (proc.stdout + proc.stderr).decode("utf-8", "replace")
        if rc != 0 or latex_errors(log) or not _RERUN.search(log):
            break
    ok = rc == 0 and not latex_errors(log) and pdf.is_file()
    return ok, log, (pdf if pdf.is_file() else None)


def latex_errors(log: str) -> list[str]:
    """The error lines (those starting with ``!``) of a TeX log, each with the
    ``l.<n>`` context line that follows it when there is one."""
    lines = log.splitlines()
    errors = []
    for k, line in enumerate(lines):
        if line.startswith("!"):
            ctx = next((ln for ln in lines[k + 1 : k + 12] if re.match(r"l\.\d+ ", ln)), None)
            errors.append(f"{line} [{ctx.strip()}]" if ctx else line)
    return errors


def overfull_boxes(log: str, *, min_pt: float = 0.0) -> list[str]:
    """The ``Overfull \\hbox (<size>pt too wide) ...`` lines of a TeX log, e.g.
    ``'Overfull \\hbox (12.3pt too wide) in paragraph at lines 5--7'``, keeping only
    those wider than ``min_pt`` points. Use the log from :func:`compile_latex`
    (unwrapped); for a wrapped log each message is still found, maybe truncated."""
    return [m.group(0).rstrip() for m in _OVERFULL.finditer(log) if float(m["pt"]) > min_pt]


def bitmap_fonts(log: str) -> list[str]:
    """Bitmap (``.pk``, Type 3) fonts embedded in the PDF, from the font list at the
    end of a pdflatex log. Non-empty e.g. for ``\\usepackage[T1]{fontenc}`` without
    ``lmodern`` (or ``cm-super``): the EC text fonts are then rendered by METAFONT."""
    return sorted({Path(p).name for p in _PK_FONT.findall(log)})
